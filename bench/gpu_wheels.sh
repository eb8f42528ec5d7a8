#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a GPU machine whose Python (3.12, CUDA torch) has no internet and
# lacks DeepSpeed and pydantic. Run here (with internet); it fills build/gpu_wheels/ (ignored by git), which
# the GPU machine receives beside the working tree and gpu_check.sh installs into a scratch folder.
#
#   bench/gpu_wheels.sh                       (env: PY_VERSION=3.12  WHEELS=build/gpu_wheels)
#
# The versions are the ones this project's .venv runs. torch, numpy, einops, msgpack, psutil, py-cpuinfo,
# tqdm and ninja are taken from the GPU machine's own Python (typing-extensions travels: pydantic needs a recent one).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
WHEELS="${WHEELS:-build/gpu_wheels}"
PY_VERSION="${PY_VERSION:-3.12}"
mkdir -p "$WHEELS"
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

binary=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  v="$(version "$name")"
  [ -n "$v" ] || { echo "gpu_wheels: $name is not installed in this .venv; run infra/setup.sh first." >&2; exit 2; }
  binary+=("$name==$v")
done
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "${binary[@]}"

# DeepSpeed ships as a source package; its wheel without pre-built ops is pure Python (ops build on demand,
# and the engine's torch Adam needs none).
ds="$(version deepspeed)"
if ! ls "$WHEELS"/deepspeed-"$ds"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PIP" wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$ds"
fi
ls -1 "$WHEELS"
du -sh "$WHEELS"
