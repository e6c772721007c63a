#!/usr/bin/env bash
# The one prepared GPU check of the vLLM backend (issue 18), for a machine the `device` tool lends.
# Builds .venv-vllm with the CUDA `vllm` wheel (PREFSTEER_VLLM_WHEEL=vllm scripts/bootstrap_vllm.sh),
# runs the vLLM parity tests and the vLLM benchmark on the GPU, and writes the tables and logs into
# $OUT/results/ (the device tool brings $OUT back) or results/gpu/ when $OUT is unset. Budget: under
# 10 minutes of device time (wheel install ~3 min, engine start ~1 min per process, tests + bench ~4).
# The machine needs pip access to PyPI (or PIP_FIND_LINKS / PIP_NO_INDEX pointing at carried wheels:
# vllm's CUDA wheel and its needs are several hundred MB, more than some device tools can carry).
#
#   bash scripts/gpu_check.sh              # the real run (on the lent machine)
#   bash scripts/gpu_check.sh --dry-run    # print the steps, run nothing (checked on the CPU machine)
#   bash scripts/gpu_check.sh --skip-tests # benchmarks only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0; tests=1; bench=1; new_tokens=128
for a in "$@"; do
  case $a in
    --dry-run) dry=1 ;;
    --skip-tests) tests=0 ;;
    --skip-bench) bench=0 ;;
    --new-tokens=*) new_tokens=${a#*=} ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$a' (see --help)" >&2; exit 2 ;;
  esac
done
out="${OUT:+$OUT/results}"; out="${out:-results/gpu}"
run() { echo "+ $*"; [[ $dry == 1 ]] || "$@"; }
step() { echo "== $* ($(date +%T))"; }

step "machine"
run mkdir -p "$out/vllm"
if [[ $dry == 0 ]]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; nproc; } \
    | tee "$out/machine.txt"
fi
machine="$( [[ $dry == 0 ]] && head -1 "$out/machine.txt" | cut -d, -f1 || echo GPU)"

step "environment: .venv-vllm with the CUDA vllm wheel"
run env PREFSTEER_VLLM_WHEEL="${PREFSTEER_VLLM_WHEEL:-vllm}" bash scripts/bootstrap_vllm.sh
py=.venv-vllm/bin/python

if [[ $tests == 1 ]]; then
  step "parity tests (float32 on the GPU, against the hf backend in the same process)"
  run timeout 300 $py -m pytest -q -p no:cacheprovider tests/test_vllm.py -o log_cli=false \
    --junitxml="$out/vllm/test_vllm.xml" 2>&1 | { [[ $dry == 1 ]] && cat || tee "$out/vllm/test_vllm.log" | tail -5; }
fi
if [[ $bench == 1 ]]; then
  step "benchmarks: EXACT indexing vllm vs hf (bfloat16, the GPU default), generation at batch 1/8/32"
  run timeout 300 $py benchmarks/vllm_bench.py --dtype bfloat16 --new-tokens "$new_tokens" \
    --machine "$machine" --out "$out/vllm"
fi
step "done: tables in $out"
