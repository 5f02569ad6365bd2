#!/bin/bash
# Download (here, with PyPI access) the wheels the serving benchmark needs on the GPU beyond the
# engine's payload, and build this project's wheel, into .whl/ (ignored; carried next to .gpu/).
# usage, from the repo root: bash bench/gpu/fetch_wheels.sh [DEST]   (~20 MB; redo the project
# wheel after every change: the tiers run from it on the GPU)
#   vllm serve 0.26's entry points import: uvicorn, prometheus-fastapi-instrumentator,
#     model-hosting-container-standards (+ jmespath), watchfiles (found by walking the module-level
#     imports of vllm/entrypoints/{cli,openai,serve} in the 0.26 wheel)
#   grpcio 1.85: the generated stubs refuse an older grpcio than the grpcio-tools that made them
#     (the device image has had 1.84); grpcio-health-checking/-reflection for the tiers, grpcio-status
#     and googleapis-common-protos for the google.rpc error details
#   py-spy: bench/device_profile.sh
set -eu
D=${1:-.whl}; mkdir -p "$D"
W="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64"
python3 -m pip download -q $W -d "$D" uvicorn==0.54.0 prometheus-fastapi-instrumentator==8.1.0 \
    model-hosting-container-standards==0.1.16 jmespath==1.0.1 watchfiles==1.3.0 \
    grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1 \
    googleapis-common-protos==1.76.0 py-spy==0.4.3
rm -f "$D"/kimivl-*.whl
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$D" .     # this project, generated stubs included
ls -la "$D"
