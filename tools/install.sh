#!/usr/bin/env bash
# Creates (or completes) the project virtualenv .venv with everything catseg needs.
# Idempotent: each step checks whether it is already done, so a second run takes seconds
# and an interrupted run picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.catseg-install-stamp"
# The stamp records the inputs of the install; when they change, the install runs again.
want=$(cat setup.cfg tools/install.sh | sha1sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import catseg" 2>/dev/null; then
    echo "[install] .venv is up to date"
    exit 0
fi

step() { echo "[install] $*"; }
[ -x "$VENV/bin/python" ] || { step "creating virtualenv $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
pip_() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
    step "installing torch 2.14.1 + torchvision 0.29.1"
    pip_ torch==2.14.1 torchvision==0.29.1
fi

step "installing catseg and its dependencies (editable, with test tools, the web demo and SAM)"
pip_ -e ".[test,web,sam]"

# The web demo's browser test drives Debian's chromium through chromium-driver (selenium).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        step "installing chromium and chromium-driver (apt-get, for the web demo's browser test)"
        apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }
    else
        step "chromium / chromium-driver missing: install them (apt-get install chromium chromium-driver) for the browser test"
    fi
fi

# detectron2 is not on PyPI. A user who built it from source keeps their build.
# (Deep imports, so that a copy cut short by an interruption is detected and redone.)
if ! "$VPY" -c "import detectron2.engine, detectron2.evaluation, detectron2.projects.deeplab" 2>/dev/null; then
    step "installing detectron2 (sal-detectron2 0.7.2 wheel, cp310 build, pure-Python parts)"
    site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    tmp=$(mktemp -d)
    "$VPY" -m pip install --disable-pip-version-check -q --no-deps --only-binary=:all: \
        --python-version 3.10 --target "$tmp" sal-detectron2==0.7.2
    # Move into site-packages only once complete, so an interrupted run leaves no half package.
    cp -r "$tmp"/. "$site"/
    rm -rf "$tmp"
fi

"$VPY" -W ignore -c "import catseg, detectron2, open_clip, timm"
echo "$want" > "$STAMP"
step "done"
