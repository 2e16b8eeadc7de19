"""CAPTCHA checks with the provider's siteverify endpoint (Turnstile, hCaptcha, reCAPTCHA, or the
sandbox provider in sandbox mode, captcha_sandbox.py).

All three take a form POST of `secret`, `response` (the token) and `remoteip`, and answer
JSON `{"success": bool, "error-codes": [...], "hostname": ..., ...}` (reCAPTCHA v3 adds a
`score`). Tokens are single-use: the keyed hash of every presented token is claimed in the
edge database before the provider is asked, so two replicas never accept the same token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
from otpgate.common.v1 import common_pb2

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.errors import ServiceError, failed_precondition, unavailable
from services.core.logging import get_logger
from services.edge import metrics
from services.edge.captcha_sandbox import SandboxCaptcha
from services.edge.store import EdgeStore

log = get_logger(__name__)

PROVIDER_URLS = {
    "turnstile": "https://challenges.cloudflare.com/turnstile/v0/siteverify",
    "hcaptcha": "https://api.hcaptcha.com/siteverify",
    "recaptcha": "https://www.google.com/recaptcha/api/siteverify",
}
SANDBOX_PROVIDER = "sandbox"
MAX_TOKEN_LENGTH = 4096
TOKEN_PURPOSE = "captcha-token"  # noqa: S105 - a hash purpose label, not a secret


@dataclass(frozen=True)
class CaptchaSettings:
    provider: str
    secret: str
    verify_url: str
    timeout: float = 5.0
    # How long a used token is remembered (providers accept a token for at most 5 minutes).
    token_ttl: float = 600.0
    # reCAPTCHA v3 / hCaptcha Enterprise scores below this fail.
    min_score: float = 0.5
    # Accepted hostnames (empty: any).
    hostnames: tuple[str, ...] = ()


def captcha_required() -> ServiceError:
    return failed_precondition(
        "CAPTCHA_REQUIRED",
        "a CAPTCHA is required for this request: send captcha_token",
        [("CAPTCHA", "captcha_token", "solve the CAPTCHA and send its token")],
    )


def captcha_invalid(description: str) -> ServiceError:
    return failed_precondition(
        "CAPTCHA_INVALID", f"the CAPTCHA token was refused: {description}", [("CAPTCHA", "captcha_token", description)]
    )


def may_send_sms(channel: int, sms_fallback: bool) -> bool:
    return channel in (common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_TELEGRAM_GATEWAY) or (
        channel in (common_pb2.CHANNEL_AUTO, common_pb2.CHANNEL_UNSPECIFIED) and sms_fallback
    )


def policy_demands(rule: int, sms_possible: bool) -> bool:
    return rule == common_pb2.CAPTCHA_RULE_ALWAYS or (rule == common_pb2.CAPTCHA_RULE_SMS and sms_possible)


class CaptchaVerifier:
    def __init__(
        self,
        settings: CaptchaSettings,
        store: EdgeStore,
        keyring: Keyring,
        clock: Clock,
        sandbox: SandboxCaptcha | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._sandbox = sandbox
        self._session: aiohttp.ClientSession | None = None

    @property
    def configured(self) -> bool:
        """Whether tokens can be checked at all (a provider secret, or the sandbox provider)."""
        return self._sandbox is not None or bool(self.settings.secret)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def verify(self, token: str, remote_ip: str) -> None:
        """Returns when the token is valid and unused; raises FAILED_PRECONDITION otherwise."""
        if not token:
            metrics.captcha_verifications_total.labels("missing").inc()
            raise captcha_required()
        if not self.configured:
            metrics.captcha_verifications_total.labels("unavailable").inc()
            log.error("captcha_not_configured", provider=self.settings.provider)
            raise unavailable("CAPTCHA_UNAVAILABLE", "CAPTCHA verification is not configured")
        if len(token) > MAX_TOKEN_LENGTH:
            metrics.captcha_verifications_total.labels("failed").inc()
            raise captcha_invalid("malformed token")
        token_hash = self._keyring.secret_hash(TOKEN_PURPOSE, token)
        expire_at = self._clock.now() + timedelta(seconds=self.settings.token_ttl)
        if not await self._store.claim_captcha_token(token_hash, expire_at):
            metrics.captcha_verifications_total.labels("replayed").inc()
            raise captcha_invalid("the token was already used")
        try:
            answer = await self._siteverify(token, remote_ip)
        except ServiceError:
            # The provider never saw it: let the person retry with the same token.
            await self._store.captcha_tokens.delete_one({"_id": token_hash})
            raise
        problem = self._judge(answer)
        if problem:
            metrics.captcha_verifications_total.labels("failed").inc()
            log.info("captcha_failed", provider=self.settings.provider, problem=problem)
            raise captcha_invalid(problem)
        metrics.captcha_verifications_total.labels("passed").inc()

    async def _siteverify(self, token: str, remote_ip: str) -> dict[str, Any]:
        if self._sandbox is not None:
            return self._sandbox.siteverify(token, remote_ip)
        form = {"secret": self.settings.secret, "response": token}
        if remote_ip:
            form["remoteip"] = remote_ip
        try:
            async with self._http().post(self.settings.verify_url, data=form) as reply:
                body = await reply.read()
                if reply.status >= 500 or reply.status == 429:
                    raise _provider_down(f"HTTP {reply.status}")
                answer = json.loads(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _provider_down(type(exc).__name__) from None
        except ValueError:
            raise _provider_down("not JSON") from None
        if not isinstance(answer, dict):
            raise _provider_down("unexpected answer")
        return answer

    def _judge(self, answer: dict[str, Any]) -> str:
        """'' when the answer accepts the token, else a short reason."""
        if answer.get("success") is not True:
            codes = answer.get("error-codes") or []
            return ", ".join(str(c) for c in codes) if isinstance(codes, list) and codes else "not accepted"
        score = answer.get("score")
        if isinstance(score, int | float) and score < self.settings.min_score:
            return "score too low"
        if self.settings.hostnames and answer.get("hostname") not in self.settings.hostnames:
            return "wrong hostname"
        return ""


def _provider_down(what: str) -> ServiceError:
    metrics.captcha_verifications_total.labels("unavailable").inc()
    log.warning("captcha_provider_unavailable", problem=what)
    return unavailable("CAPTCHA_UNAVAILABLE", "the CAPTCHA provider could not be reached; retry", retry_after=1)
