"""Where a request came from: the peer address, or the first untrusted X-Forwarded-For hop."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Sequence[str]) -> list[Network]:
    """CIDRs or single addresses; raises ValueError on a bad entry."""
    return [ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip()]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = text.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def grpc_peer_ip(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' / 'ipv6:[::1]:5678' -> the address ('' for unix sockets and the like)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0]
        address = _address(host)
        return str(address) if address else host.strip("[]")
    return ""


class OriginResolver:
    def __init__(self, trusted_proxies: Sequence[Network] = ()) -> None:
        self._trusted = list(trusted_proxies)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address.version == net.version and address in net for net in self._trusted)

    def client_ip(self, peer_ip: str, forwarded_for: str = "") -> str:
        """The peer, unless it is a trusted proxy: then the right-most X-Forwarded-For hop that is
        not a trusted proxy (hops left of it could be forged by the client)."""
        peer = _address(peer_ip)
        if peer is None:
            return peer_ip
        if not self._trusted or not forwarded_for or not self._is_trusted(peer):
            return str(peer)
        hops = [hop for hop in (h.strip() for h in forwarded_for.split(",")) if hop]
        chosen = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:  # garbage in the chain: stop at what we can trust
                break
            chosen = address
            if not self._is_trusted(address):
                break
        return str(chosen)
