#!/usr/bin/env bash
# Build the side virtualenvs the interop tests (tests/test_interop.py) load our artifacts in: the peers a user
# already has installed, at the versions we support. Reused when their requirements did not change.
#   bash tests/interop/setup.sh            # -> .venv-interop/<name>/ in the repository root
# COMPRESS_INTEROP_DIR puts them elsewhere. torch stays the local CPU build (constraints.txt): an unpinned
# torch would pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/tests/interop"
dir="${COMPRESS_INTEROP_DIR:-$root/.venv-interop}"
mkdir -p "$dir"

build() {  # build NAME REQUIREMENT...
  local name="$1"; shift
  local want; want="$(printf '%s\n' "$@" | cat - "$here/constraints.txt" | sha256sum | cut -c1-16)"
  if [ -f "$dir/$name/.requirements" ] && [ "$(cat "$dir/$name/.requirements")" = "$want" ]; then
    echo "interop venv $name: up to date ($dir/$name)"
    return
  fi
  echo "interop venv $name: installing $*"
  rm -rf "$dir/$name"
  python3 -m venv "$dir/$name"
  "$dir/$name/bin/pip" install -q -c "$here/constraints.txt" "$@"
  echo "$want" > "$dir/$name/.requirements"
}

# transformers 4.x: the line optimum-onnx pins (transformers<4.58); the oldest we support (compress.portable).
# The ONNX peers live here too: optimum-onnx's ORTModelForCausalLM needs this transformers line, and
# onnxruntime-genai 0.18 runs on the same onnxruntime (1.32) as the project.
build tf4 torch==2.13.0 transformers==4.57.6 safetensors 'optimum-onnx[onnxruntime]==0.1.0' onnxruntime-genai==0.18.0
# GPTQModel 7.6 (the maintained successor of auto-gptq; 7.7 needs torch>=2.14.1): loads our GPTQ folders with
# its default CPU kernel, which refuses groups that do not divide a layer's width.
build gptqmodel torch==2.13.0 gptqmodel==7.6.0
