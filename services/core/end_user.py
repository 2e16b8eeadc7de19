"""What a client tells us about its end user and what it asks us to send, checked alike everywhere.

The edge checks a request's end_user_ip, end_user_agent and text before it calls anything else
(the CAPTCHA provider, delivery); delivery and verification check the Origin and text they
receive again, since any caller inside the deployment may send them. An address is kept in its
canonical text form (an IPv4-mapped IPv6 address as IPv4), so limits and the fraud guard count
one address under one key.
"""

from __future__ import annotations

import ipaddress
import unicodedata

from otpgate.common.v1 import common_pb2

from services.core.errors import Violations

MAX_TEXT = 4096  # Telegram's limit for one message
MAX_USER_AGENT = 512
MAX_SESSION_ID = 256
# IPv4 addresses of one network (a home router, a carrier's NAT pool) share the first 24 bits;
# IPv6 end sites get a /48 (RFC 6177).
IPV4_NETWORK_BITS = 24
IPV6_NETWORK_BITS = 48


def canonical_ip(text: str) -> str:
    """The canonical form of an end user's IP address; ValueError for anything else."""
    address = ipaddress.ip_address(text.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast:
        raise ValueError("not the address of a host")
    return str(address)


def ip_network(ip: str) -> str:
    """The network an address belongs to (/24 or /48), e.g. "198.51.100.0/24"; "" for no address."""
    if not ip:
        return ""
    address = ipaddress.ip_address(ip)
    bits = IPV4_NETWORK_BITS if address.version == 4 else IPV6_NETWORK_BITS
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


def check_ip(problems: Violations, field_path: str, value: str) -> str:
    """The canonical address ("" when unset); adds a violation when it is not an IP address."""
    if not value:
        return ""
    try:
        return canonical_ip(value)
    except ValueError:
        problems.add(field_path, "must be an IPv4 or IPv6 address, e.g. 203.0.113.7")
        return ""


def check_user_agent(problems: Violations, field_path: str, value: str) -> None:
    problems.check(
        len(value) <= MAX_USER_AGENT and value.isprintable(),
        field_path,
        f"must be at most {MAX_USER_AGENT} printable characters",
    )


def check_origin(problems: Violations, origin: common_pb2.Origin, prefix: str = "origin") -> None:
    """The Origin a service receives: a valid address, a printable device and session."""
    check_ip(problems, f"{prefix}.ip", origin.ip)
    check_user_agent(problems, f"{prefix}.user_agent", origin.user_agent)
    check_session_id(problems, f"{prefix}.session_id", origin.session_id)


def check_session_id(problems: Violations, field_path: str, value: str) -> None:
    problems.check(
        len(value) <= MAX_SESSION_ID and value.isprintable(),
        field_path,
        f"must be at most {MAX_SESSION_ID} printable characters",
    )


def has_visible_character(text: str) -> bool:
    """Whether a text shows anything: a letter, digit, mark, punctuation or symbol (not only
    spaces and control or format characters, which Telegram and SMS show as nothing)."""
    return any(not unicodedata.category(char).startswith(("C", "Z")) for char in text)


def check_text(problems: Violations, field_path: str, text: str, max_length: int) -> None:
    if not problems.check(1 <= len(text) <= max_length, field_path, f"must be 1 to {max_length} characters"):
        return
    problems.check(has_visible_character(text), field_path, "must contain a visible character")
