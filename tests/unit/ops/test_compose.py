"""compose/: the YAML is valid and every service, port, file and variable it names exists in the code."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.core.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from tests.unit.ops.names import COMPOSE, PYTHON, ROOT, SERVICES, code_corpus, declared_settings, run

COMPOSE_FILE = COMPOSE / "docker-compose.yml"
INFRA = {"mongo", "mongo-init", "cli", "mongodb-exporter", "blackbox-exporter", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def known_variables() -> set[str]:
    """Every variable the code declares (tools/configref.py --json) plus those the CLI reads."""
    from services.cli.edge_client import CLI_ENVIRONMENT

    return set(declared_settings()) | {name for name, _, _ in CLI_ENVIRONMENT}


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_every_otpgate_service_runs_its_own_module_from_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == set(SERVICES) | INFRA
    builds = set()
    for svc in SERVICES:
        spec = services[svc]
        assert spec["command"] == [f"services.{svc}"]
        assert (ROOT / "services" / svc / "__main__.py").exists()
        builds.add((spec["build"]["context"], spec["build"]["dockerfile"], spec["image"]))
        assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"]
    assert len(builds) == 1
    context, dockerfile, _ = builds.pop()
    assert (COMPOSE / context / dockerfile).resolve() == COMPOSE / "Dockerfile"


def test_the_image_runs_as_a_non_root_user() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert "useradd" in dockerfile
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text()
    for needed in ("services/", "gen/", "pyproject.toml", "requirements.lock"):
        assert f"!{needed}" in ignore


def test_healthchecks_use_grpc_health_through_the_cli(compose: dict[str, Any]) -> None:
    from services.cli.main import build_parser

    parser = build_parser()
    for svc in SERVICES:
        test = compose["services"][svc]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "otpgate"]
        args = parser.parse_args(test[2:])
        assert args.command == "status" and args.service == [svc] and args.no_database
        # the container's own replica, not whichever one the service name resolves to
        assert args.target == [(svc, f"localhost:{DEFAULT_PORTS[svc]}")]


def test_ports_and_addresses_match_the_code_defaults(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for svc in SERVICES:
        env = services[svc]["environment"]
        upper = svc.upper()
        assert env[f"OTPGATE_{upper}_PORT"] == str(DEFAULT_PORTS[svc])
        assert env[f"OTPGATE_{upper}_METRICS_PORT"] == str(DEFAULT_METRICS_PORTS[svc])
        assert env[f"OTPGATE_{upper}_HOST"] == "0.0.0.0"
        assert env["OTPGATE_METRICS_HOST"] == "0.0.0.0"
        for other, port in DEFAULT_PORTS.items():
            assert env[f"OTPGATE_{other.upper()}_ADDR"] == f"{other}:{port}"
        assert env["MONGODB_URI"].startswith(f"mongodb://otpgate_{svc}:")
        assert "replicaSet=rs0" in env["MONGODB_URI"]


def test_only_the_edge_is_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    published = {name for name, spec in services.items() if spec.get("ports")}
    assert published == {"edge", "prometheus", "grafana"}
    edge_ports = {p.split(":")[-1] for p in services["edge"]["ports"]}
    assert edge_ports == {str(DEFAULT_PORTS["edge"]), services["edge"]["environment"]["OTPGATE_EDGE_HTTP_PORT"]}
    for name in ("prometheus", "grafana"):  # SRE tools: the host's loopback only
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    assert compose["networks"]["backend"]["internal"] is True
    assert services["mongo"]["networks"] == ["backend"]


def test_internal_traffic_is_mutual_tls(compose: dict[str, Any]) -> None:
    for svc in SERVICES:
        spec = compose["services"][svc]
        env = spec["environment"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in spec["volumes"]}
        for var, cert in (
            ("OTPGATE_TLS_CA", "ca.crt"),
            ("OTPGATE_TLS_CERT", f"{svc}.crt"),
            ("OTPGATE_TLS_KEY", f"{svc}.key"),
        ):
            assert mounts[env[var]] == f"./certs/{cert}", (svc, var)


def test_every_file_mounted_exists_or_is_made_by_certs_sh(compose: dict[str, Any], tmp_path: Path) -> None:
    result = run(["bash", str(COMPOSE / "certs.sh"), str(tmp_path / "certs")])
    assert result.returncode == 0, result.stderr
    made = {p.name for p in (tmp_path / "certs").iterdir()}
    defaults = _env_file(COMPOSE / ".env.example")
    for name, spec in compose["services"].items():
        for mount in spec.get("volumes", []):
            source = mount.split(":")[0]
            source = re.sub(r"\$\{(\w+)(:-([^}]*))?\}", lambda m: defaults.get(m.group(1)) or m.group(3) or "", source)
            if not source.startswith("./"):
                continue  # a named volume
            if source.startswith("./certs/"):
                assert source.removeprefix("./certs/") in made, f"{name}: {source}"
            else:
                assert (COMPOSE / source).exists(), f"{name}: {source}"


def test_certificates_chain_to_the_ca_and_name_their_service(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    out = tmp_path / "certs"
    assert run(["bash", str(COMPOSE / "certs.sh"), str(out)]).returncode == 0
    for svc in SERVICES:
        verify = run([openssl, "verify", "-CAfile", str(out / "ca.crt"), str(out / f"{svc}.crt")])
        assert verify.returncode == 0, verify.stdout + verify.stderr
        text = run([openssl, "x509", "-in", str(out / f"{svc}.crt"), "-noout", "-text"]).stdout
        assert f"DNS:{svc}" in text
        assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    assert (out / "mongo-keyfile").stat().st_size > 500
    before = (out / "ca.crt").read_bytes()
    assert run(["bash", str(COMPOSE / "certs.sh"), str(out)]).returncode == 0  # re-running keeps the CA
    assert (out / "ca.crt").read_bytes() == before
    assert oct((out / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_every_variable_set_for_a_service_is_read_by_the_code(
    compose: dict[str, Any], known_variables: set[str]
) -> None:
    corpus = code_corpus()
    problems = []
    for svc in [*SERVICES, "cli"]:
        for name in compose["services"][svc]["environment"]:
            if name not in known_variables and f'"{name}"' not in corpus:
                problems.append(f"{svc}: {name}")
    for example in sorted(COMPOSE.glob("?*.env.example")):  # the services' env files, not compose's .env
        for name in _env_file(example):
            if name not in known_variables and f'"{name}"' not in corpus:
                problems.append(f"{example.name}: {name}")
    assert problems == []


def test_secrets_come_from_env_files_that_are_not_committed(compose: dict[str, Any]) -> None:
    for svc in SERVICES:
        files = [f["path"] for f in compose["services"][svc]["env_file"]]
        assert "otpgate.env" in files
        env = compose["services"][svc]["environment"]
        assert "OTPGATE_KEYS" not in env
    assert "OTPGATE_KEYS" in _env_file(COMPOSE / "otpgate.env.example")
    assert _env_file(COMPOSE / "otpgate.env.example")["OTPGATE_KEYS"] == ""
    ignored = run(["git", "check-ignore", "compose/otpgate.env", "compose/.env", "compose/certs/ca.key"], cwd=ROOT)
    assert ignored.stdout.split() == ["compose/otpgate.env", "compose/.env", "compose/certs/ca.key"]
    tracked = run(["git", "ls-files", "compose"], cwd=ROOT).stdout.split()
    assert not [t for t in tracked if t.endswith(".env") or "/certs/" in t]


def test_every_interpolated_variable_has_an_example(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    defined = set(_env_file(COMPOSE / ".env.example"))
    missing = {name for name in used - defined if not re.search(r"\$\{" + name + r":-", text)}
    assert missing == set()


def test_prometheus_scrapes_every_metrics_port_and_probes_every_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    scraped = {t for sc in jobs["otpgate"]["static_configs"] for t in sc["targets"]}
    assert scraped == {f"{svc}:{DEFAULT_METRICS_PORTS[svc]}" for svc in SERVICES}
    probed = {t for sc in jobs["otpgate-health"]["static_configs"] for t in sc["targets"]}
    assert probed == {f"{svc}:{DEFAULT_PORTS[svc]}" for svc in SERVICES}
    for job in jobs.values():
        for sc in job["static_configs"]:
            for t in sc["targets"]:
                host = t.split(":")[0]
                assert host == "localhost" or host in compose["services"], t
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_shell_scripts_parse() -> None:
    for script in (COMPOSE / "certs.sh", COMPOSE / "init-env.sh", COMPOSE / "mongo" / "init-replica.sh"):
        result = run(["bash", "-n", str(script)])
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), script


def test_init_env_writes_every_env_file_with_fresh_secrets(tmp_path: Path) -> None:
    for example in [COMPOSE / ".env.example", *COMPOSE.glob("*.env.example")]:
        shutil.copy(example, tmp_path / example.name)
    shutil.copy(COMPOSE / "init-env.sh", tmp_path / "init-env.sh")
    cli = Path(PYTHON).parent / "otpgate"
    result = run(["bash", str(tmp_path / "init-env.sh"), str(cli)])
    assert result.returncode == 0, result.stderr
    dotenv = _env_file(tmp_path / ".env")
    assert "change-me" not in (tmp_path / ".env").read_text()
    assert re.fullmatch(r"[0-9a-f]{48}", dotenv["MONGO_ROOT_PASSWORD"])
    assert dotenv["MONGO_ROOT_PASSWORD"] != dotenv["MONGO_EDGE_PASSWORD"]
    from services.core.crypto import Keyring

    Keyring.parse(_env_file(tmp_path / "otpgate.env")["OTPGATE_KEYS"])
    assert oct((tmp_path / "otpgate.env").stat().st_mode & 0o777) == "0o600"
    first = (tmp_path / ".env").read_text()
    assert run(["bash", str(tmp_path / "init-env.sh"), str(cli)]).returncode == 0
    assert (tmp_path / ".env").read_text() == first  # kept, never overwritten


def test_compose_mk_targets_exist() -> None:
    text = (COMPOSE / "compose.mk").read_text()
    for target in ("certs", "compose-env", "compose-config", "compose-up", "compose-down", "alerts-test"):
        assert re.search(rf"^{target}:", text, re.MULTILINE), target


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker compose is not available here; the YAML checks above stand in for it")
    work = tmp_path / "compose"
    shutil.copytree(COMPOSE, work, ignore=shutil.ignore_patterns("*.env", ".env", "certs"))
    for example in [work / ".env.example", *work.glob("*.env.example")]:
        shutil.copy(example, example.with_name(example.name.removesuffix(".example")))
    result = run([docker, "compose", "-f", str(work / "docker-compose.yml"), "config", "--quiet"], cwd=work)
    assert result.returncode == 0, result.stderr


def test_the_mongo_init_script_is_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    text = (COMPOSE / "mongo" / "init-replica.sh").read_text()
    script = text.split("script=$(cat <<JS\n", 1)[1].split("\nJS\n)", 1)[0]
    script = re.sub(r"\$\{MONGO_\w+(:-)?\}", "x", script)
    assert "${" not in script
    path = tmp_path / "init.js"
    path.write_text(script)
    result = run([node, "--check", str(path)])
    assert result.returncode == 0, result.stderr
    for svc in SERVICES:  # one user per service, on its own database only
        assert f"MONGO_{svc.upper()}_PASSWORD" in text
    assert 'ensureUser("otpgate_" + svc, passwords[svc], [{role: "readWrite", db: "otpgate_" + svc}])' in text


def _composecheck() -> Path | None:
    """compose/composecheck (compose-go, the loader of `docker compose config`), built once into .cache/bin."""
    binary = ROOT / ".cache" / "bin" / "composecheck"
    source = COMPOSE / "composecheck"
    newest = max(p.stat().st_mtime for p in source.iterdir())
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    go = shutil.which("go")
    if go is None:
        return None
    binary.parent.mkdir(parents=True, exist_ok=True)
    result = run([go, "build", "-o", str(binary), "."], cwd=source, timeout=600)
    return binary if result.returncode == 0 else None


def test_compose_go_accepts_it_as_docker_compose_config_would(tmp_path: Path) -> None:
    checker = _composecheck()
    if checker is None:
        pytest.skip("go is not available, or compose-go could not be fetched")
    work = tmp_path / "compose"
    shutil.copytree(COMPOSE, work, ignore=shutil.ignore_patterns("*.env", ".env", "certs", "composecheck"))
    for example in [work / ".env.example", *work.glob("?*.env.example")]:
        shutil.copy(example, example.with_name(example.name.removesuffix(".example")))
    result = run([str(checker), str(work / "docker-compose.yml"), str(work)])
    assert result.returncode == 0, result.stderr
    project = yaml.safe_load(result.stdout)
    assert set(project["services"]) == set(SERVICES) | INFRA
    edge = project["services"]["edge"]
    assert {p["target"] for p in edge["ports"]} == {50051, 8080}
    assert [Path(f).name for f in edge["env_file"]] == ["otpgate.env", "edge.env"]
    # A missing secret is refused at interpolation, as docker compose refuses it.
    (work / ".env").write_text((work / ".env").read_text().replace("MONGO_DIRECTORY_PASSWORD=", "#"))
    refused = run([str(checker), str(work / "docker-compose.yml"), str(work)])
    assert refused.returncode == 1 and "MONGO_DIRECTORY_PASSWORD" in refused.stderr
