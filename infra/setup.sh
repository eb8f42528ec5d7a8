#!/usr/bin/env bash
# Brings .venv up to date: system packages FFCV needs, torch (pinned), the project with all its extras.
# Quick when nothing changed: a stamp holds the hash of what the install depends on.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"   # override for a CUDA cluster, e.g. TORCH_VERSION=2.13.0+cu128
PYTHON="${PYTHON:-python3}"
VENV=.venv
stamp="$VENV/.bitmixer-setup"
want=$( (cat pyproject.toml infra/setup.sh; echo "$TORCH_VERSION") | sha256sum | cut -d' ' -f1)

# FFCV compiles against OpenCV and libjpeg-turbo; pkg-config, g++ and ninja build it and DeepSpeed's ops;
# the training loader's crop-only JPEG decoder is built on first use against libjpeg's own headers;
# rsync is what the Ray cluster launcher uploads with (tests/infra runs it with the launcher's filter);
# chromium is the browser tests/ui opens the MLflow UI in (headless, driven by Playwright).
apt_pkgs="libopencv-dev libturbojpeg0-dev libjpeg-dev pkg-config g++ ninja-build rsync chromium"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing system packages:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: the build and the tests need these system packages; install them and run again: sudo apt-get install$missing" >&2
    exit 1
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" numpy pillow wheel setuptools   # FFCV's build imports numpy and does not declare Pillow
"${pip[@]}" -e ".[all]"
echo "$want" > "$stamp"
echo "setup: .venv is up to date (torch $TORCH_VERSION)"
