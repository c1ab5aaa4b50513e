#!/usr/bin/env bash
# Make a Python environment that runs a given local ComfyUI folder together with this pack and its tests.
#
#   tools/setup_comfyui.sh COMFYUI_DIR VENV [FRONTEND_VERSION]
#
# COMFYUI_DIR  a ComfyUI source folder, e.g. from a bare mirror:
#                mkdir DIR && git --git-dir=<mirror> archive HEAD -- . \
#                  ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' | tar -x -C DIR
#              (this workplace's mirror of Comfy-Org/ComfyUI 0.3.64 lacks that one large file's blob, so a plain
#              `archive HEAD` stops there; nothing this pack uses needs it)
# VENV         the virtual environment to create or update
# FRONTEND_VERSION  the comfyui-frontend-package version to install (default: the one ComfyUI's
#              requirements.txt pins; 0.3.64 pins 1.27.10)
#
# torch/torchvision are installed first at the versions this repo's requirements-dev.txt pins (they come from local
# disk here). ComfyUI's requirements.txt follows, package by package, so one that fails to install (e.g. a package
# without a wheel for this Python) is reported and skipped rather than stopping the rest. Last, this repo's
# requirements.txt and the test tools (pytest), so `VENV/bin/python -m pytest tests/test_native.py` works with
#   COMFYUI_0364_DIR=COMFYUI_DIR.
set -u
if [ $# -lt 2 ]; then
    sed -n 2,19p "$0"
    exit 2
fi
COMFYUI_DIR=$(cd "$1" && pwd) || { echo "no such folder: $1" >&2; exit 2; }
VENV=$2
FRONTEND=${3:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}

[ -f "$COMFYUI_DIR/requirements.txt" ] || { echo "$COMFYUI_DIR has no requirements.txt" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" || exit 1
fi
PIP="$VENV/bin/python -m pip"

torch_pin=$(grep -E '^torch==' "$REPO/requirements-dev.txt" | head -1)
tv_pin=$(grep -E '^torchvision==' "$REPO/requirements-dev.txt" | head -1)
$PIP install "${torch_pin:-torch}" "${tv_pin:-torchvision}" || exit 1

failed=()
while IFS= read -r line; do
    req=$(echo "${line%%#*}" | xargs)          # drop comments and blanks
    [ -z "$req" ] && continue
    case "$req" in
        torch|torch[\<\>=!~]*|torchvision|torchvision[\<\>=!~]*) continue ;;   # keep the pinned ones
        comfyui-frontend-package*) [ -n "$FRONTEND" ] && req="comfyui-frontend-package==$FRONTEND" ;;
    esac
    $PIP install "$req" || failed+=("$req")
done < "$COMFYUI_DIR/requirements.txt"

$PIP install -r "$REPO/requirements.txt" pytest || failed+=("$REPO/requirements.txt")

if [ ${#failed[@]} -gt 0 ]; then
    echo "setup_comfyui: these did not install: ${failed[*]}" >&2
fi
"$VENV/bin/python" - "$COMFYUI_DIR" <<'EOF'
import sys, importlib
sys.path.insert(0, sys.argv[1])
import torch
print("torch", torch.__version__)
import comfy.cli_args
if not torch.cuda.is_available():  # ComfyUI's model management would look for a GPU
    comfy.cli_args.args.cpu = True
for mod in ("comfy.model_base", "comfy.sample", "comfy_extras.nodes_custom_sampler"):
    importlib.import_module(mod)
import comfyui_version
print("ComfyUI", comfyui_version.__version__, "imports")
EOF
