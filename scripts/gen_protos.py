"""Generate protos/' Python code into serving/wire/_proto/, or check that the committed code is current.

protoc writes absolute imports rooted at the proto path (``from conveyor.v1 import ...``, ``from inference
import ...``); the generated packages live inside ``serving.wire``, so those imports are rewritten to
``serving.wire._proto.conveyor.v1`` and ``serving.wire._proto.inference``.
The files are committed so that the serving image needs no grpcio-tools; ``--check`` (run by ``make test``)
fails when regenerating would change them.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGET = ROOT / "serving" / "wire" / "_proto"
# mypy-protobuf's plugins are installed beside this interpreter, which need not be on PATH.
BIN = Path(sys.executable).parent
# protoc's imports of each proto package, and where the generated package lives.
IMPORTS = {
    "from conveyor.v1 import": "from serving.wire._proto.conveyor.v1 import",
    "from inference import": "from serving.wire._proto.inference import",
}


def generate(out_dir: Path) -> None:
    """Run protoc for every .proto under protos/ into out_dir and make the result an importable package."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        for before, after in IMPORTS.items():
            text = text.replace(before, after)
        path.write_text(text)
    for package in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        (package / "__init__.py").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths whose content differs, or that exist on one side only."""
    names = {p.relative_to(left) for p in left.rglob("*") if p.is_file()}
    names |= {p.relative_to(right) for p in right.rglob("*") if p.is_file()}
    return sorted(
        str(n)
        for n in names
        if not ((left / n).is_file() and (right / n).is_file() and filecmp.cmp(left / n, right / n, False))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is not current")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        fresh.mkdir()
        generate(fresh)
        if check:
            stale = differences(fresh, TARGET)
            if stale:
                sys.exit(f"generated protobuf code is stale ({', '.join(stale)}): run `make proto`")
            print("generated protobuf code is current")
            return
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(fresh, TARGET)
        print(f"generated {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
