"""Choosing CLIPer's guidance strength alpha once, on held-out prompts.

For every alpha of a grid and every preference, the calibration prompts ('calibration' split of
the TL;DR posts, disjoint from training and evaluation) are answered with that preference's guide.
Strength is the base model's log-likelihood ratio per token of the answer with vs without a line
stating the preference after the prompt (the evaluation's scorer; not the classifier), fluency the base
model's perplexity of the answer under the plain prompt. The chosen alpha has the largest mean
strength gain over alpha = 0 (plain decoding) among the alphas whose mean perplexity is at most
``ppl_bound`` times plain decoding's.

    >>> res = calibrate(backend, CalibrationConfig(prefs="concise,humor", n_prompts=4))   # doctest: +SKIP
    >>> res["chosen_alpha"], format_curve(res)                                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prefsteer.methods.cliper.prefs import PREFERENCES

log = logging.getLogger(__name__)

ALL_PREFS = ",".join(PREFERENCES)  # the built-in preferences: concise,humor,formal,empathetic,helpful


@dataclass
class CalibrationConfig:
    """What `calibrate` runs (``prefsteer cliper calibrate``'s options)."""
    prefs: str = field(default=ALL_PREFS, metadata={
        "help": f"preferences, each calibrated alone and averaged (default: {ALL_PREFS})"})
    alphas: str = field(default="0,0.5,1,2,4,8", metadata={"help": "the alpha grid"})
    ppl_bound: float = field(default=1.5, metadata={
        "help": "allowed perplexity ratio to plain decoding (default 1.5: at most 50% higher)"})
    n_prompts: int = field(default=16, metadata={"help": "held-out prompts ('calibration' split)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per answer"})
    top_k: int = field(default=20, metadata={"help": "candidates re-scored per step"})
    data: str | None = field(default=None, metadata={
        "help": "TL;DR comparisons (default: ../shared/data/tldr/batch13.json)"})
    classifiers: list[str] | None = field(default=None, metadata={"help": "extra classifier directory"})

    def __post_init__(self):
        from prefsteer.errors import InputError

        if self.ppl_bound < 1:
            raise InputError(f"`ppl_bound` (={self.ppl_bound}) has to be at least 1", field="--ppl-bound")
        for name in ("n_prompts", "max_new_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` (={getattr(self, name)}) has to be at least 1",
                                 field="--" + name.replace("_", "-"))


def calibrate(backend, config: CalibrationConfig) -> dict[str, Any]:
    """The strength and perplexity curve over ``config.alphas`` on ``backend``, and the chosen alpha."""
    from prefsteer.backends.base import GenerationConfig, user_turn
    from prefsteer.methods.registry import Resources, build
    from prefsteer.methods.cliper.data import tldr_prompts
    from prefsteer.evaluation.cliper_eval import score_condition
    from prefsteer.methods.cliper.guidance import check_alpha
    from prefsteer.methods.cliper.prefs import parse_prefs

    prefs = [p for p in parse_prefs(config.prefs, allow_personal=False)]
    alphas = sorted({check_alpha(float(a)) for a in str(config.alphas).split(",") if a.strip()} | {0.0})
    rows = tldr_prompts("calibration", config.n_prompts, config.data)
    prompts = [r["prompt"] for r in rows]
    cfg = GenerationConfig(max_new_tokens=config.max_new_tokens)
    ctx = [user_turn(p) for p in prompts]
    t0 = time.perf_counter()

    def run(guide) -> dict:
        gens = backend.generate(ctx, cfg, guide=guide)
        return {"texts": [g.text for g in gens], "token_ids": [g.token_ids for g in gens]}

    plain = score_condition(backend, run(None), prompts, prefs)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base_llr = {p: mean(plain[f"llr:{p}"]) for p in prefs}
    base_ppl = mean(plain["ppl"])
    curve = [{"alpha": 0.0, "gain": {p: 0.0 for p in prefs}, "mean_gain": 0.0, "ppl": base_ppl,
              "ppl_ratio": 1.0, "length": {p: mean(plain["length"]) for p in prefs}}]
    for alpha in alphas[1:]:
        gains, ppls, lengths = {}, [], {}
        for p in prefs:
            cliper = build("cliper", backend, Resources(classifier_dirs=list(config.classifiers or [])),
                           {"prefs": {p: 1.0}, "alpha": alpha, "top_k": config.top_k})
            guide, _ = cliper.guide_for(None)
            m = score_condition(backend, run(guide), prompts, [p])
            gains[p] = mean(m[f"llr:{p}"]) - base_llr[p]
            ppls.append(mean(m["ppl"]))
            lengths[p] = mean(m["length"])
            log.info("alpha %g %s: gain %+.3f ppl %.2f", alpha, p, gains[p], ppls[-1])
        ppl = mean(ppls)
        curve.append({"alpha": alpha, "gain": gains, "mean_gain": mean(list(gains.values())), "ppl": ppl,
                      "ppl_ratio": ppl / base_ppl, "length": lengths})
    ok = [c for c in curve if c["ppl_ratio"] <= config.ppl_bound]
    best = max(ok, key=lambda c: (c["mean_gain"], -c["alpha"]))
    return {"chosen_alpha": best["alpha"], "ppl_bound": config.ppl_bound, "prefs": prefs,
            "prompts": len(prompts), "post_ids": [r["post_id"] for r in rows],
            "max_new_tokens": config.max_new_tokens, "top_k": config.top_k, "fingerprint": backend.fingerprint,
            "strength": "base-model LLR per token, with vs without '(Your answer should be <description>.)'",
            "seconds": round(time.perf_counter() - t0, 1), "curve": curve}


def format_curve(res: dict[str, Any]) -> str:
    prefs = res["prefs"]
    lines = [f"alpha calibration on {res['prompts']} held-out prompts, {res['max_new_tokens']} tokens, "
             f"top-k {res['top_k']}: strength gain = LLR/token over plain decoding; perplexity bound "
             f"{res['ppl_bound']}x plain",
             "| alpha | mean gain | " + " | ".join(prefs) + " | perplexity | ratio | within bound |",
             "|---" * (len(prefs) + 5) + "|"]
    for c in res["curve"]:
        lines.append(f"| {c['alpha']:g} | {c['mean_gain']:+.3f} | "
                     + " | ".join(f"{c['gain'][p]:+.3f}" for p in prefs)
                     + f" | {c['ppl']:.2f} | {c['ppl_ratio']:.2f} | {'yes' if c['ppl_ratio'] <= res['ppl_bound'] else 'no'} |")
    lines.append(f"chosen alpha = {res['chosen_alpha']:g}")
    return "\n".join(lines)


def plot_curve(res: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c["alpha"] for c in res["curve"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p in res["prefs"]:
        ax.plot(xs, [c["gain"][p] for c in res["curve"]], marker=".", alpha=0.6, label=p)
    ax.plot(xs, [c["mean_gain"] for c in res["curve"]], marker="o", color="black", lw=2, label="mean gain")
    ax.set_xlabel("alpha")
    ax.set_ylabel("strength gain (LLR / token)")
    ax2 = ax.twinx()
    ax2.plot(xs, [c["ppl_ratio"] for c in res["curve"]], ls="--", color="tab:red", label="perplexity ratio")
    ax2.axhline(res["ppl_bound"], color="tab:red", ls=":", lw=1)
    ax2.set_ylabel("perplexity / plain", color="tab:red")
    ax.axvline(res["chosen_alpha"], color="grey", ls=":")
    ax.set_title(f"CLIPer alpha calibration (chosen {res['chosen_alpha']:g})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
