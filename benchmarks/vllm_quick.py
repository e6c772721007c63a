"""`prefsteer eval --config quick` on --backend vllm and on --backend hf, side by side in one run.

Each engine runs in its own environment (vLLM's CPU build pins an older transformers): the hf run
in this checkout's .venv, the vLLM run in .venv-vllm. The table compares, per method, the
accuracy, the time the evaluator recorded for fitting (EXACT's indexing) and for the margins, and
the largest difference between the two engines' test margins (log-probability differences, nats).
Writes quick.md and quick.json into --out (default results/vllm/).

    python benchmarks/vllm_quick.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="quick", help="evaluation configuration (default: quick)")
    p.add_argument("--hf-env", default=str(REPO / ".venv"), help="environment of the hf run")
    p.add_argument("--vllm-env", default=str(REPO / ".venv-vllm"), help="environment of the vLLM run")
    p.add_argument("--out", default=str(REPO / "results" / "vllm"), help="where quick.md/json go")
    return p


def run_eval(env: str, backend: str, config: str, out: Path) -> dict:
    """Run one evaluation; its wall time and the 1-minute load average before and after it."""
    cmd = [str(Path(env) / "bin" / "prefsteer"), "eval", "--config", config, "--backend", backend,
           "--no-winrate", "--out", str(out)]
    load, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - start, "load": (load, os.getloadavg()[0])}


def methods_of(run_dir: Path) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for line in (run_dir / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "method":
            by[r["method"]].append(r)
    return by


def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="vllm-quick-"))
    wall = {b: run_eval(env, b, args.config, tmp / b)
            for b, env in (("hf", args.hf_env), ("vllm", args.vllm_env))}
    runs = {b: methods_of(tmp / b) for b in wall}
    rows, same_all = [], True
    for m in runs["hf"]:
        h = sorted(runs["hf"][m], key=lambda r: (r["seed"], r["user"]))
        v = sorted(runs["vllm"].get(m, []), key=lambda r: (r["seed"], r["user"]))
        if len(h) != len(v):
            raise SystemExit(f"method {m}: {len(h)} hf records but {len(v)} vllm records")
        acc = {b: sum(r["accuracy"] for r in rs) / len(rs) for b, rs in (("hf", h), ("vllm", v))}
        diff = max(abs(a - b) for rh, rv in zip(h, v) for a, b in zip(rh["margins"], rv["margins"]))
        t = {b: {k: sum(r["timings"].get(k, 0.0) for r in rs) for k in ("fit", "margins")}
             for b, rs in (("hf", h), ("vllm", v))}
        same_all &= acc["hf"] == acc["vllm"]
        rows.append({"method": m, "accuracy": acc, "max_margin_diff": diff, "timings": t})
    def ran(b: str) -> str:
        w = wall[b]
        return f"{b} {w['seconds']:.0f} s (load average {w['load'][0]:.1f} before, {w['load'][1]:.1f} after)"

    cond = (f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
            f"float32; `--no-winrate`; each engine in its own environment, one after the other; whole "
            f"commands: {ran('hf')}, {ran('vllm')}, vLLM's including its engine start")
    lines = [f"# `prefsteer eval --config {args.config}`: vLLM vs hf", "", cond, "",
             "| method | accuracy hf | accuracy vllm | max margin difference (nats) | fit s hf | fit s vllm | "
             "margins s hf | margins s vllm |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, t = r["accuracy"], r["timings"]
        lines.append(f"| {r['method']} | {a['hf']:.3f} | {a['vllm']:.3f} | {r['max_margin_diff']:.2e} | "
                     f"{t['hf']['fit']:.1f} | {t['vllm']['fit']:.1f} | {t['hf']['margins']:.1f} | "
                     f"{t['vllm']['margins']:.1f} |")
    lines += ["", f"Same accuracies for every method: **{same_all}**. Fit is EXACT's indexing (selection of "
              "every training pair) for exact and exact-global; margins score the test pairs."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quick.json").write_text(json.dumps({"conditions": cond, "wall": wall, "rows": rows}, indent=2) + "\n")
    (out / "quick.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
