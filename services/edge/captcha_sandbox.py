"""The sandbox CAPTCHA provider: the widget a person solves and the siteverify that checks it.

Sandbox mode only (OTPGATE_CAPTCHA_PROVIDER=sandbox, the sandbox default). `solve` plays the
widget: it hands out a token as Turnstile does once a person passed the challenge. `siteverify`
answers like Turnstile's endpoint, with the same JSON and error codes: a token it did not issue
is `invalid-input-response`, one older than 300 seconds or seen before is
`timeout-or-duplicate`, an empty one `missing-input-response`. Tokens are signed with a key
derived from the keyring, so every edge replica accepts the others' tokens, and each is
accepted once per replica (the edge's own single-use claim, shared by all replicas, comes
first anyway).
"""

from __future__ import annotations

import base64
import hmac
import secrets
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.errors import Violations, failed_precondition

TOKEN_LIFETIME = 300.0  # seconds, as Turnstile's
DEFAULT_HOSTNAME = "sandbox.otpgate.test"
_PREFIX = "sbx"


class SandboxCaptcha:
    def __init__(self, keyring: Keyring, clock: Clock) -> None:
        self._key = keyring.blind_index("captcha-sandbox", "token-signing").encode()
        self._clock = clock
        self._seen: dict[str, float] = {}

    def solve(self, hostname: str = "") -> str:
        """A fresh token, as the widget returns it after a solved challenge."""
        issued = int(self._clock.now().timestamp() * 1000)
        host = base64.urlsafe_b64encode((hostname or DEFAULT_HOSTNAME).encode()).decode().rstrip("=")
        body = f"{_PREFIX}.{issued}.{secrets.token_urlsafe(12)}.{host}"
        return f"{body}.{self._mac(body)}"

    def siteverify(self, token: str, remote_ip: str = "") -> dict[str, Any]:
        """The provider's answer for a token (remote_ip is accepted and, like Turnstile, not matched)."""
        if not token:
            return _refused("missing-input-response")
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != _PREFIX or not hmac.compare_digest(self._mac(".".join(parts[:4])), parts[4]):
            return _refused("invalid-input-response")
        issued = int(parts[1]) / 1000
        now = self._clock.now().timestamp()
        self._forget_before(now - TOKEN_LIFETIME)
        if now - issued > TOKEN_LIFETIME or token in self._seen:
            return _refused("timeout-or-duplicate")
        self._seen[token] = issued
        hostname = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)).decode(errors="replace")
        return {
            "success": True,
            "challenge_ts": datetime.fromtimestamp(issued, UTC).isoformat().replace("+00:00", "Z"),
            "hostname": hostname,
            "error-codes": [],
        }

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), sha256).hexdigest()[:32]

    def _forget_before(self, moment: float) -> None:
        if len(self._seen) > 10_000:
            self._seen = {token: at for token, at in self._seen.items() if at >= moment}


class CaptchaSandboxServicer(edge_pb2_grpc.CaptchaSandboxServiceServicer):
    """CaptchaSandboxService over gRPC; also the HTTP route's target (called like a stub, with a timeout).
    Without the sandbox provider (a real one is configured) it refuses: its tokens would not pass."""

    def __init__(self, sandbox: SandboxCaptcha | None) -> None:
        self._sandbox = sandbox

    async def SolveCaptcha(
        self, request: edge_pb2.SolveCaptchaRequest, context: object = None, timeout: float | None = None
    ) -> edge_pb2.SolveCaptchaResponse:
        if self._sandbox is None:
            raise failed_precondition(
                "CAPTCHA_SANDBOX_OFF", "the sandbox CAPTCHA provider is not in use (OTPGATE_CAPTCHA_PROVIDER)"
            )
        problems = Violations()
        problems.check(len(request.hostname) <= 253 and request.hostname.isprintable(), "hostname", "not a hostname")
        problems.raise_if_any()
        return edge_pb2.SolveCaptchaResponse(token=self._sandbox.solve(request.hostname))


def _refused(code: str) -> dict[str, Any]:
    return {"success": False, "error-codes": [code]}
