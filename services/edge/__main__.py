"""`python -m services.edge`.

Like services/core/bootstrap.service_main, except that the public gRPC listener takes the
edge's public certificate (OTPGATE_EDGE_TLS_CERT/KEY) rather than the internal one: clients
on the internet hold no certificates of the internal CA. The internal TLS settings
(OTPGATE_TLS_*) still secure the edge's calls to the other services.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from services.core.bootstrap import freeze_startup
from services.core.config import ConfigError, Env, TlsConfig, load_common
from services.core.grpc_server import run_service
from services.core.logging import configure_logging, get_logger
from services.core.mongo import connect
from services.edge.app import EdgeConfig, build_app, load_config


async def _run(common_env: Env) -> None:
    common = load_common("edge", common_env)
    config: EdgeConfig = load_config(common_env)
    client = connect(common.mongodb_uri, "edge")
    try:
        app = await build_app(common, config, client)
        freeze_startup()
        public = dataclasses.replace(common, tls=TlsConfig(config.tls_cert, config.tls_key, ""))
        await run_service(app, public)
    except Exception:
        get_logger(__name__).exception("service_crashed", service="edge")
        raise
    finally:
        await client.close()


def main() -> None:
    env = Env(service="edge")
    common = load_common("edge", env)
    load_config(env)
    try:
        env.check()
        if common.keyring is None:
            raise ConfigError("configuration is invalid:\n  - OTPGATE_KEYS is required")
    except ConfigError as exc:
        print(f"otpgate edge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("edge", common.log_level)
    asyncio.run(_run(Env(service="edge")))


if __name__ == "__main__":
    main()
