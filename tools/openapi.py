"""Generate the OpenAPI document of the HTTP/JSON API from the protos.

python tools/openapi.py            write gen/openapi/openapi.json
python tools/openapi.py --check    fail if the committed document differs from a fresh generation

Paths and schemas come from the generated descriptors (the same `google.api.http`
annotations the edge routes by); descriptions come from the proto comments, read with
protoc's source info.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf.descriptor_pb2 import FileDescriptorSet
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from services.edge.openapi import DOCUMENT_PATH, build_document, comments_from, render  # noqa: E402

PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party"


def descriptor_set() -> FileDescriptorSet:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{THIRD_PARTY}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        result = FileDescriptorSet()
        result.ParseFromString(out.read_bytes())
        return result


def generate() -> str:
    return render(build_document(comments_from(descriptor_set())))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the committed document for drift")
    check = parser.parse_args().check
    fresh = generate()
    if not check:
        DOCUMENT_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOCUMENT_PATH.write_text(fresh)
        return 0
    current = DOCUMENT_PATH.read_text() if DOCUMENT_PATH.exists() else ""
    if current == fresh:
        return 0
    diff = difflib.unified_diff(current.splitlines(), fresh.splitlines(), "committed", "generated", lineterm="", n=1)
    for line in list(diff)[:40]:
        print(line, file=sys.stderr)
    print(f"{DOCUMENT_PATH.relative_to(ROOT)} is stale: run `python tools/openapi.py` and commit it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
