"""Client IP from the peer and X-Forwarded-For; the edge's token buckets."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from services.core.clock import ManualClock
from services.core.errors import ServiceError
from services.edge.limits import EdgeLimits, TokenBuckets
from services.edge.origin import OriginResolver, grpc_peer_ip, parse_networks


def test_grpc_peer_addresses() -> None:
    assert grpc_peer_ip("ipv4:203.0.113.7:51234") == "203.0.113.7"
    assert grpc_peer_ip("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert grpc_peer_ip("unix:/tmp/sock") == ""


def test_forwarded_for_is_ignored_without_trusted_proxies() -> None:
    resolver = OriginResolver()
    assert resolver.client_ip("10.0.0.5", "198.51.100.1") == "10.0.0.5"


def test_first_untrusted_hop_from_the_right() -> None:
    resolver = OriginResolver(parse_networks(["10.0.0.0/8", "192.168.1.1"]))
    # Peer is a trusted proxy: walk the chain from the right, skipping trusted hops.
    assert resolver.client_ip("10.0.0.5", "198.51.100.1") == "198.51.100.1"
    assert resolver.client_ip("10.0.0.5", "1.2.3.4, 198.51.100.1, 192.168.1.1") == "198.51.100.1"
    # A client cannot forge its way in: only the right-most untrusted hop counts.
    assert resolver.client_ip("10.0.0.5", "127.0.0.1, 203.0.113.9") == "203.0.113.9"
    # An untrusted peer's header is not believed.
    assert resolver.client_ip("198.51.100.77", "1.1.1.1") == "198.51.100.77"
    # All hops trusted: the left-most.
    assert resolver.client_ip("10.0.0.5", "10.1.1.1, 10.2.2.2") == "10.1.1.1"
    # Garbage stops the walk at the last address we could trust.
    assert resolver.client_ip("10.0.0.5", "nonsense, 10.2.2.2") == "10.2.2.2"
    assert resolver.client_ip("::ffff:10.0.0.5", "198.51.100.1") == "198.51.100.1"


def test_bad_proxy_entries_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_networks(["10.0.0.0/33"])


def test_token_bucket_burst_refill_and_wait() -> None:
    clock = ManualClock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # independent buckets
    clock.advance(0.5)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    clock.advance(10)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]


def test_token_buckets_stay_bounded() -> None:
    clock = ManualClock()
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock, max_entries=100)
    for i in range(1000):
        buckets.take(f"ip{i}")
    assert len(buckets._buckets) <= 100


def test_limits_raise_resource_exhausted_with_retry_info() -> None:
    clock = ManualClock()
    limits = EdgeLimits(clock, key_rate=1, key_burst=1, ip_rate=0, ip_burst=1)
    for _ in range(50):
        limits.check_ip("1.2.3.4")  # rate 0: off
    limits.check_key("k")
    with pytest.raises(ServiceError) as caught:
        limits.check_key("k")
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "EDGE_RATE_LIMITED")
    retry = next(d for d in error.details if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.seconds == 1
