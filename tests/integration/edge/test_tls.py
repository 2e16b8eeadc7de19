"""TLS on the public listeners, and mutual TLS between the edge and an internal service."""

from __future__ import annotations

import datetime
import importlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.config import Env, TlsConfig, load_common
from services.core.crypto import Keyring
from services.core.errors import parse_rpc_error
from services.core.grpc_server import RunningService, start_service
from services.core.mongo import Document
from services.edge.app import EdgeApp
from tests.support.stack import _spec_of, _uri_of, stack_env


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_pair(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def make_pki(folder: Path) -> dict[str, str]:
    """A throwaway CA, and certificates for 127.0.0.1 signed by it (server + client use)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("otpgate test CA"))
        .issuer_name(_name("otpgate test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": str(folder / "ca.pem")}
    paths["ca_pem"] = ca.public_bytes(serialization.Encoding.PEM).decode()
    Path(paths["ca"]).write_text(paths["ca_pem"])
    for stem in ("public", "internal"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"otpgate {stem}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{stem}_cert"], paths[f"{stem}_key"] = _write_pair(folder, stem, key, cert)
    return paths


@asynccontextmanager
async def _service(
    name: str, env: dict[str, str], client: AsyncMongoClient[Document], clock: ManualClock, tls: TlsConfig | None
) -> AsyncIterator[tuple[RunningService, Any]]:
    """Build a service exactly as `python -m services.<name>` does; serve gRPC with `tls`."""
    module = importlib.import_module(f"services.{name}.app")
    reader = Env(env, service=name)
    common = load_common(name, reader)
    config = module.load_config(reader)
    reader.check()
    app = await module.build_app(common, config, client, clock)
    running = await start_service(app, common.host, common.port, tls=tls)
    try:
        yield running, app
    finally:
        await running.stop(0)
        await client.drop_database(common.database)


async def test_public_listeners_serve_tls(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    env = stack_env(
        _uri_of(mongo_client),
        ",".join(_spec_of(keyring)),
        {"OTPGATE_EDGE_TLS_CERT": pki["public_cert"], "OTPGATE_EDGE_TLS_KEY": pki["public_key"]},
    )
    public = TlsConfig(pki["public_cert"], pki["public_key"], "")  # what services/edge/__main__.py serves with
    async with _service("edge", env, mongo_client, clock, public) as (running, app):
        assert isinstance(app, EdgeApp)
        trust = ssl.create_default_context(cafile=pki["ca"])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{app.http_port}/openapi.json", ssl=trust) as reply:
                assert reply.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{app.http_port}/openapi.json") as reply:
                    await reply.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca_pem"].encode())
        async with grpc.aio.secure_channel(running.address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await edge_pb2_grpc.PublicServiceStub(channel).ListBots(edge_pb2.ListBotsRequest(), timeout=5)
            assert parse_rpc_error(caught.value).reason == "API_KEY_MISSING"  # reached the servicer over TLS
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await edge_pb2_grpc.PublicServiceStub(channel).ListBots(edge_pb2.ListBotsRequest(), timeout=2)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_between_edge_and_delivery(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    internal = {
        "OTPGATE_TLS_CERT": pki["internal_cert"],
        "OTPGATE_TLS_KEY": pki["internal_key"],
        "OTPGATE_TLS_CA": pki["ca"],
        "OTPGATE_RPC_TIMEOUT": "2",
    }
    env = stack_env(_uri_of(mongo_client), ",".join(_spec_of(keyring)), internal)
    server_tls = TlsConfig(pki["internal_cert"], pki["internal_key"], pki["ca"])  # requires client certificates
    async with (
        _service("delivery", env, mongo_client, clock, server_tls),
        _service("edge", env, mongo_client, clock, None) as (_, edge),
    ):
        assert isinstance(edge, EdgeApp) and edge.admin is not None
        client = await edge.admin.create_client("Shop")
        _, key = await edge.admin.create_key(client.id, [])
        url = f"http://127.0.0.1:{edge.http_port}/v1/messages/01HZZZZZZZZZZZZZZZZZZZZZZZ"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {key}"}) as reply:
            body = await reply.json()
        # Delivery answered (an unknown message) through the mutually authenticated channel.
        assert reply.status == 404, body
        # An edge without a client certificate is turned away by delivery.
        no_cert = {**env, "OTPGATE_TLS_CERT": "", "OTPGATE_TLS_KEY": "", "OTPGATE_EDGE_HTTP_PORT": "0"}
        no_cert["OTPGATE_EDGE_PORT"] = "0"
        no_cert["OTPGATE_RPC_TIMEOUT"] = "0.5"
        no_cert["OTPGATE_EDGE_DATABASE"] = env["OTPGATE_EDGE_DATABASE"] + "_b"
        async with _service("edge", no_cert, mongo_client, clock, None) as (_, stranger):
            assert isinstance(stranger, EdgeApp) and stranger.admin is not None
            other = await stranger.admin.create_client("Shop")
            _, other_key = await stranger.admin.create_key(other.id, [])
            url = f"http://127.0.0.1:{stranger.http_port}/v1/messages/01HZZZZZZZZZZZZZZZZZZZZZZZ"
            async with (
                aiohttp.ClientSession() as http,
                http.get(url, headers={"Authorization": f"Bearer {other_key}"}) as reply,
            ):
                assert reply.status in (503, 504)  # refused handshakes until the deadline
