"""What the edge checks in a sending request before it calls anything else.

A request that delivery or verification would refuse for its shape is refused here first, so an
invalid request never spends a CAPTCHA token, asks the CAPTCHA provider or reads a policy. The
limits that depend on the services' settings (ttl bounds, for one) are theirs to check. The
end user's address is the one the client sent (`end_user_ip`), else the one the edge saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2

from services.core.end_user import MAX_TEXT, check_ip, check_session_id, check_text, check_user_agent
from services.core.errors import Violations
from services.core.phone import InvalidPhoneError, parse_phone
from services.edge.captcha import MAX_TOKEN_LENGTH

MAX_REQUEST_ID = 128
MAX_BOT = 64
CODE_LENGTHS = range(4, 11)


@dataclass(frozen=True)
class EndUser:
    """The person a request is for, as far as the edge knows them."""

    ip: str
    user_agent: str
    session_id: str

    def origin(self, *, captcha_verified: bool, captcha_possible: bool) -> common_pb2.Origin:
        return common_pb2.Origin(
            ip=self.ip,
            user_agent=self.user_agent,
            session_id=self.session_id,
            captcha_verified=captcha_verified,
            captcha_possible=captcha_possible,
        )


def _common(
    problems: Violations, seen_ip: str, request: edge_pb2.SendMessageRequest | edge_pb2.StartVerificationRequest
) -> EndUser:
    """The fields both requests share; the end user's address is the one sent, else the one seen."""
    try:
        parse_phone(request.phone)
    except InvalidPhoneError as exc:
        problems.add("phone", str(exc))
    ip = check_ip(problems, "end_user_ip", request.end_user_ip)
    check_user_agent(problems, "end_user_agent", request.end_user_agent)
    check_session_id(problems, "session_id", request.session_id)
    token_ok = len(request.captcha_token) <= MAX_TOKEN_LENGTH
    problems.check(token_ok, "captcha_token", f"at most {MAX_TOKEN_LENGTH} characters")
    problems.check(len(request.request_id) <= MAX_REQUEST_ID, "request_id", f"at most {MAX_REQUEST_ID} characters")
    problems.check(len(request.bot) <= MAX_BOT, "bot", f"at most {MAX_BOT} characters")
    return EndUser(ip=ip or seen_ip, user_agent=request.end_user_agent, session_id=request.session_id)


def check_send(request: edge_pb2.SendMessageRequest, seen_ip: str) -> EndUser:
    """The end user of a SendMessage; raises INVALID_ARGUMENT with every violation."""
    problems = Violations()
    check_text(problems, "text", request.text, MAX_TEXT)
    user = _common(problems, seen_ip, request)
    problems.raise_if_any()
    return user


def check_start(request: edge_pb2.StartVerificationRequest, seen_ip: str) -> EndUser:
    """The end user of a StartVerification; raises INVALID_ARGUMENT with every violation."""
    problems = Violations()
    problems.check(request.code_length == 0 or request.code_length in CODE_LENGTHS, "code_length", "must be 4 to 10")
    user = _common(problems, seen_ip, request)
    problems.raise_if_any()
    return user
