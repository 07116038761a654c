"""Generate Python stubs and .pyi files from protos/ into gen/ (git-ignored).

The google/rpc and google/api protos come from the googleapis-common-protos
wheel: they are copied into protos/.deps (git-ignored), which buf.yaml lists as
a second module and which protoc gets with -I. Their Python code is not
generated: the wheel already ships it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api
import google.rpc
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEPS = PROTOS / ".deps"
OUT = ROOT / "gen"


def copy_google_protos() -> None:
    for package in (google.rpc, google.api):
        source = Path(package.__path__[0])
        target = DEPS / "google" / source.name
        target.mkdir(parents=True, exist_ok=True)
        for proto in source.glob("*.proto"):
            shutil.copyfile(proto, target / proto.name)


def generate() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "switchboard").rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__path__[0]) / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{DEPS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    # Regular packages (not namespace packages) so that type checkers and
    # importers agree on the module names, which equal the proto packages.
    for directory in [OUT / "switchboard", *(OUT / "switchboard").rglob("*")]:
        if directory.is_dir():
            (directory / "__init__.py").touch()
    (OUT / "switchboard" / "py.typed").touch()
    print(f"generated {len(sources)} protos into {OUT.relative_to(ROOT)}/")


if __name__ == "__main__":
    copy_google_protos()
    generate()
