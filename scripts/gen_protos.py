"""Generate Python code for protos/kimivl/v1/*.proto into clients/python/kimivl/v1/.

Run by the build (setup.py) and by `make proto`.
"""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOS = os.path.join(ROOT, "protos")
OUT = os.path.join(ROOT, "clients", "python")


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(glob.glob(os.path.join(PROTOS, "kimivl", "v1", "*.proto")))
    if not files:
        raise SystemExit(f"no .proto files under {PROTOS}")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))
    init = os.path.join(OUT, "kimivl", "v1", "__init__.py")
    with open(init, "w") as f:
        f.write('"""Generated from protos/kimivl/v1 at build time; do not edit."""\n')


if __name__ == "__main__":
    generate()
    print("generated", file=sys.stderr)
