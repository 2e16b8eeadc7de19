"""Generate the Python gRPC stubs and .pyi types from protos/ into gen/.

python tools/protogen.py            regenerate gen/
python tools/protogen.py --check    fail if gen/ differs from a fresh generation
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party"
GEN = ROOT / "gen"
BIN = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages, so mypy and setuptools see otpgate.<svc>.v1 without namespace tricks.
    for package in [out / "otpgate", *(p for p in (out / "otpgate").rglob("*") if p.is_dir())]:
        (package / "__init__.py").touch()
    (out / "otpgate" / "py.typed").touch()


def differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [f"only in {cmp.left}: {n}" for n in cmp.left_only]
    found += [f"only in {cmp.right}: {n}" for n in cmp.right_only]
    found += [f"differs: {Path(cmp.left, n)}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        found += differences(a / sub, b / sub)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check gen/ for drift instead of writing it")
    check = parser.parse_args().check
    if not check:
        shutil.rmtree(GEN / "otpgate", ignore_errors=True)
        generate(GEN)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drift = (
            differences(Path(tmp) / "otpgate", GEN / "otpgate")
            if (GEN / "otpgate").is_dir()
            else ["gen/otpgate missing"]
        )
    for line in drift:
        print(f"codegen drift: {line}", file=sys.stderr)
    if drift:
        print("generated code is stale: run `make proto` and commit gen/", file=sys.stderr)
    return 1 if drift else 0


if __name__ == "__main__":
    raise SystemExit(main())
