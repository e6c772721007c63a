"""The known-answer suite: users written by the project, each with one style that one attribute
of the library names, so EXACT's selection can be checked against the answer.

``resources/known_answer.jsonl`` holds 6 users x 8 pairs (``user_id``, ``style`` = the target
attribute, ``prompt``, ``chosen``, ``rejected``); chosen and rejected differ in the style and as
little else as possible (similar length, except for Concise). ``known_answer_prompts.jsonl`` holds
20 new prompts. Two metrics:

- **recovery**: the share of a user's pairs whose selected set contains the target attribute
  (chance: k / library size, 3/42 = 7% for the full library at k=3);
- **effect**: on the new prompts, each user's personalized answer (EXACT, the retrieved
  attributes injected) against the plain answer under a stated measure of the style (`MEASURES`):
  the mean of each, its relative change, and the share of prompts moved in the intended direction.

With ``"oracle": true`` the configuration also generates with each user's *target* injected
under every variant's rendering: the effect a perfect selection would have, so a weak effect can be
put on the selection or on how far the model follows the attribute at all. ``"select": false``
measures only that (no selection, no retrieval).

    prefsteer eval --config known-answer --backend hf --out results/known-answer   # the table
    prefsteer eval --config known-answer --n-prompts 5                              # fewer prompts

The configuration (``configs/known-answer.json``, ``"kind": "known-answer"``) lists the EXACT
settings compared (``variants``: a label and `ExactConfig` keyword arguments), ``k``, an optional
attribute subset, ``n_prompts`` and ``max_new_tokens``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from prefsteer.errors import InputError
from prefsteer.types import PreferencePair

SUITE = "known_answer.jsonl"
PROMPTS = "known_answer_prompts.jsonl"
RECORDS = "records.jsonl"
TABLE = "table.md"

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _rate(text: str, hits: int) -> float:
    """Per 100 words."""
    return 100.0 * hits / max(len(words(text)), 1)


FORMAL_WORDS = frozenset("""therefore however furthermore moreover consequently regarding additionally thus
    ensure kindly please sincerely respectfully recommend advise appropriate shall hereby request accordingly
    dear regards would may assist require professional""".split())
INFORMAL_WORDS = frozenset("""hey hi gonna wanna kinda sorta guys stuff cool awesome yeah yep ok okay lol omg
    totally super pretty just basically really""".split())
HUMOR_WORDS = frozenset("""joke jokes funny laugh laughing haha lol kidding pun puns hilarious silly giggle
    comedy witty amusing ha""".split())
EMPATHY_WORDS = frozenset("""feel feeling feelings understand understandable sorry hear tough hard normal
    natural okay support care worry worried stress stressful overwhelming overwhelmed alone gentle
    kind""".split())


def concise_measure(text: str) -> float:
    return float(len(words(text)))


def formal_measure(text: str) -> float:
    ws = words(text)
    contractions = sum("'" in w and not w.endswith("'s") for w in ws)
    formal = sum(w in FORMAL_WORDS for w in ws)
    informal = sum(w in INFORMAL_WORDS for w in ws) + contractions + text.count("!")
    return _rate(text, formal - informal)


def exclamatory_measure(text: str) -> float:
    return _rate(text, text.count("!") + len(_EMOJI.findall(text)))


def humor_measure(text: str) -> float:
    return _rate(text, sum(w in HUMOR_WORDS for w in words(text)) + len(_EMOJI.findall(text)))


def empathy_measure(text: str) -> float:
    return _rate(text, sum(w in EMPATHY_WORDS for w in words(text)))


def code_measure(text: str) -> float:
    """1 for an answer with code (a fenced block, an inline `span` or an indented line), else 0."""
    return float("```" in text or bool(re.search(r"`[^`\n]+`", text)) or
                 bool(re.search(r"^(    |\t)\S", text, re.M)))


@dataclass(frozen=True)
class Measure:
    name: str                       # what is measured, as the table says it
    fn: Callable[[str], float]
    direction: int                  # +1: the style raises it; -1: lowers it
    unit: str = ""


MEASURES: dict[str, Measure] = {
    "Concise": Measure("words", concise_measure, -1),
    "Formal": Measure("formality (formal - informal words, contractions, '!') per 100 words", formal_measure, +1),
    "Exclamatory": Measure("'!' and emoji per 100 words", exclamatory_measure, +1),
    "Humor": Measure("humour words and emoji per 100 words", humor_measure, +1),
    "Empathetic": Measure("empathy words per 100 words", empathy_measure, +1),
    "Code": Measure("share of answers with code", code_measure, +1),
}


# -- data ------------------------------------------------------------------------------------

@dataclass
class Suite:
    pairs: list[PreferencePair]
    targets: dict[str, str]         # user -> the attribute their style is
    prompts: list[str] = field(default_factory=list)

    def users(self) -> list[str]:
        return list(self.targets)


def _lines(path: str | Path | None, default: str) -> tuple[str, list[str]]:
    if path is None:
        return (f"prefsteer/resources/{default}",
                resources.files("prefsteer.resources").joinpath(default).read_text("utf-8").splitlines())
    try:
        return str(path), Path(path).read_text("utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read the known-answer suite: {e.strerror}", file=str(path)) from e


def load_suite(path: str | Path | None = None, prompts: str | Path | None = None,
               library=None) -> Suite:
    """The suite's pairs and targets (validated: every field present, one style per user, a style
    the library names and `MEASURES` measures) and its new prompts."""
    from prefsteer.attributes import load_library

    library = library or load_library()
    source, lines = _lines(path, SUITE)
    pairs, targets = [], {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg}", file=source, line=i) from None
        for key in ("user_id", "style", "prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise InputError("missing or empty", file=source, line=i, field=key)
        style = library.get(row["style"]).name
        if style not in MEASURES:
            raise InputError(f"no measure for style '{style}' (measured: {', '.join(MEASURES)})",
                             file=source, line=i, field="style")
        user = row["user_id"]
        if targets.setdefault(user, style) != style:
            raise InputError(f"user '{user}' has two styles, {targets[user]} and {style}", file=source,
                             line=i, field="style")
        pairs.append(PreferencePair(user, row["prompt"], row["chosen"], row["rejected"],
                                    row.get("pair_id") or f"{user}:{i}"))
    psource, plines = _lines(prompts, PROMPTS)
    new = []
    for i, line in enumerate(plines, 1):
        if line.strip():
            try:
                new.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError("expected {\"prompt\": ...}", file=psource, line=i, field="prompt") from None
    return Suite(pairs, targets, new)


def subset(suite: Suite, users: int = 0, pairs_per_user: int = 0, prompts: int = 0) -> Suite:
    """The first ``users`` users, ``pairs_per_user`` pairs each and ``prompts`` prompts (0: all)."""
    keep = suite.users()[:users] if users else suite.users()
    count: dict[str, int] = {}
    ps = []
    for p in suite.pairs:
        if p.user_id in keep and (not pairs_per_user or count.get(p.user_id, 0) < pairs_per_user):
            count[p.user_id] = count.get(p.user_id, 0) + 1
            ps.append(p)
    return Suite(ps, {u: suite.targets[u] for u in keep},
                 suite.prompts[:prompts] if prompts else list(suite.prompts))


# -- metrics on records ----------------------------------------------------------------------

def recovery(records: Sequence[dict], variant: str | None = None) -> dict[str, float]:
    """Per user (and ``"all"``), the share of selection records whose attributes hold the target."""
    by: dict[str, list[bool]] = {}
    for r in records:
        if r.get("kind") == "selection" and (variant is None or r["variant"] == variant):
            hit = r["target"] in r["attributes"]
            by.setdefault(r["user"], []).append(hit)
            by.setdefault("all", []).append(hit)
    return {u: sum(h) / len(h) for u, h in by.items()}


def effects(records: Sequence[dict], variant: str | None = None,
            kind: str = "generation") -> dict[str, dict[str, Any]]:
    """Per user: the style's measure on the plain and the personalized answers (means), the
    relative change, and the share of prompts where personalized beats plain in the style's
    direction (a tie does not count). ``kind="oracle"``: the answers with the target injected."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") == kind and (variant is None or r["variant"] == variant):
            by.setdefault(r["user"], []).append(r)
    out = {}
    for user, rs in by.items():
        style = rs[0]["target"]
        m = MEASURES[style]
        plain = [m.fn(r["plain"]) for r in rs]
        pers = [m.fn(r["text"]) for r in rs]
        mp, mq = sum(plain) / len(plain), sum(pers) / len(pers)
        moved = sum((q - p) * m.direction > 0 for p, q in zip(plain, pers)) / len(rs)
        change = (mq - mp) / abs(mp) if mp else None
        out[user] = {"style": style, "measure": m.name, "direction": m.direction, "plain": mp,
                     "personalized": mq, "change": change, "moved": moved, "n": len(rs),
                     "intended": (mq - mp) * m.direction > 0}
    return out


def effect_line(user: str, e: dict[str, Any]) -> str:
    """One line: ``ava (Concise): 38% shorter than plain (words 52.0 -> 32.1; 5 of 5 prompts)``."""
    n_moved = round(e["moved"] * e["n"])
    if e["style"] == "Concise" and e["change"] == 0:
        head = "as long as plain"
    elif e["style"] == "Concise" and e["change"] is not None:
        pct = abs(100 * e["change"])
        head = f"{pct:.0f}% {'shorter' if e['change'] < 0 else 'longer'} than plain"
    else:
        if e["personalized"] == e["plain"]:
            head = "no different from plain"
        else:
            head = f"{'more' if e['personalized'] > e['plain'] else 'less'} {e['style'].lower()} than plain"
    if not e["intended"]:
        head += " (NOT the intended direction)" if e["personalized"] != e["plain"] else " (no effect)"
    return (f"{user} ({e['style']}): {head} ({e['measure']} {e['plain']:.2f} -> {e['personalized']:.2f}; "
            f"moved the intended way on {n_moved} of {e['n']} prompts)")


# -- running ---------------------------------------------------------------------------------

def is_known_answer(name_or_path: str) -> bool:
    """Whether a configuration name or file is a known-answer one (``"kind": "known-answer"``)."""
    from prefsteer.evaluation.protocol import CONFIG_DIR

    p = Path(name_or_path)
    path = p if p.suffix == ".json" or p.exists() else CONFIG_DIR / f"{name_or_path}.json"
    try:
        return json.loads(path.read_text()).get("kind") == "known-answer"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_ka_config(name_or_path: str) -> dict:
    from prefsteer.evaluation.protocol import CONFIG_DIR

    p = Path(name_or_path)
    path = p if p.suffix == ".json" or p.exists() else CONFIG_DIR / f"{name_or_path}.json"
    cfg = json.loads(path.read_text())
    known = {"kind", "notes", "suite", "prompts", "k", "attributes", "n_prompts", "max_new_tokens",
             "variants", "users", "pairs_per_user", "oracle", "select"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}",
                         file=str(path), field=unknown[0])
    cfg.setdefault("name", path.stem)
    return cfg


def run(backend, cfg: dict, out_dir: str | Path, *, embedder=None, n_prompts: int | None = None,
        variants: Sequence[str] | None = None, progress: bool = False, generate: bool = True,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """Select (k, each variant) for every suite pair, then generate plain and personalized answers
    on the new prompts; write ``records.jsonl`` and ``table.md`` into ``out_dir``. Selections and
    scores are kept in ``memory.sqlite`` there, so a rerun re-scores nothing."""
    from prefsteer.attributes import load_library
    from prefsteer.backends.base import GenerationConfig, user_turn
    from prefsteer.storage import Memory
    from prefsteer.methods.registry import Resources, build

    out = Path(out_dir)
    library = load_library()
    if cfg.get("attributes"):
        library = library.subset(cfg["attributes"])
    suite = load_suite(cfg.get("suite"), cfg.get("prompts"))
    n = cfg.get("n_prompts", 20) if n_prompts is None else n_prompts
    suite = subset(suite, cfg.get("users", 0), cfg.get("pairs_per_user", 0), n)
    missing = [t for t in suite.targets.values() if t not in library.names]
    if missing:
        raise InputError(f"the attribute subset lacks the targets {missing}", field="attributes")
    select, oracle = cfg.get("select", True), cfg.get("oracle", False)
    if not select and not (oracle and generate and suite.prompts):
        raise InputError("`select` is false, so `oracle` has to be true and there have to be new prompts: "
                         "nothing would be measured", field="select")
    out.mkdir(parents=True, exist_ok=True)  # the configuration checked: only now is anything written
    memory = Memory(out / "memory.sqlite")
    gen_cfg = GenerationConfig(max_new_tokens=cfg.get("max_new_tokens", 60))
    specs = [v for v in cfg.get("variants", [{"label": "paper", "kwargs": {}}])
             if variants is None or v["label"] in variants]
    records: list[dict] = []
    start = time.perf_counter()
    plain: dict[str, str] = {}
    if generate and suite.prompts:
        log(f"plain answers to {len(suite.prompts)} prompts ...")
        texts = backend.generate([user_turn(p) for p in suite.prompts], gen_cfg)
        plain = {p: g.text for p, g in zip(suite.prompts, texts)}
    for spec in specs:
        exact = build("exact", backend, Resources(memory=memory, embedder=embedder, library=library, progress=progress),
                      {"k": cfg.get("k", 3), **spec.get("kwargs", {})})
        t0 = time.perf_counter()
        if oracle and generate and suite.prompts:  # the ceiling: the target itself injected
            for user, target in suite.targets.items():
                contexts = [exact.attribute_messages(p, [target]) for p in suite.prompts]
                for p, g in zip(suite.prompts, backend.generate(contexts, gen_cfg)):
                    records.append({"kind": "oracle", "variant": spec["label"], "user": user, "target": target,
                                    "prompt": p, "attributes": [target], "text": g.text, "plain": plain[p]})
            log(f"{spec['label']}: the targets injected into {len(suite.prompts)} prompts per user "
                f"({time.perf_counter() - t0:.0f}s)")
        if not select:
            continue
        for user, target in suite.targets.items():
            ps = [p for p in suite.pairs if p.user_id == user]
            memory.add_pairs(ps)
            exact.fit(user, ps)
            for p in ps:
                s = memory.selection(user, p.pair_id, exact.config_id)
                records.append({"kind": "selection", "variant": spec["label"], "user": user, "target": target,
                                "pair_id": p.pair_id, "attributes": s["attributes"], "gains": s["gains"],
                                "objective": s["objective"], "base_objective": s["base_objective"]})
        log(f"{spec['label']}: selected {len(suite.pairs)} pairs in {time.perf_counter() - t0:.0f}s, "
            f"recovery {100 * recovery(records, spec['label']).get('all', 0):.0f}%")
        if generate and suite.prompts:
            for user, target in suite.targets.items():
                outs = exact.generate(user, suite.prompts, gen_cfg)
                for p, o in zip(suite.prompts, outs):
                    records.append({"kind": "generation", "variant": spec["label"], "user": user,
                                    "target": target, "prompt": p, "attributes": o.attributes, "text": o.text,
                                    "plain": plain[p]})
    info = {"config": cfg, "model": backend.info(),
            "fingerprint": getattr(backend, "fingerprint", ""), "library": list(library.names),
            "n_prompts": len(suite.prompts), "users": suite.targets, "seconds": time.perf_counter() - start,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out / RECORDS, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    (out / TABLE).write_text(table(records, info))
    return {"records": len(records), "out": str(out), "seconds": info["seconds"],
            "recovery": {v["label"]: recovery(records, v["label"]) for v in specs},
            "effects": {v["label"]: effects(records, v["label"]) for v in specs},
            "oracle": {v["label"]: effects(records, v["label"], "oracle") for v in specs}}


def table(records: Sequence[dict], info: dict) -> str:
    """Markdown: per variant and user, recovery and the style measure plain vs personalized."""
    cfg = info.get("config", {})
    lib = info.get("library", [])
    k = cfg.get("k", 3)
    lines = [f"# Known-answer suite ({cfg.get('name', 'known-answer')})", "",
             f"Model {info.get('model', {}).get('model', info.get('fingerprint', '?'))}; "
             f"{len(lib)} attributes, k={k} (chance of holding the target: {100 * min(k, len(lib)) / max(len(lib), 1):.0f}%); "
             f"{info.get('n_prompts', 0)} new prompts, {cfg.get('max_new_tokens', 60)} new tokens, greedy; "
             f"{info.get('seconds', 0):.0f} s; {info.get('created', '')}.", ""]
    if cfg.get("notes"):
        lines += [cfg["notes"], ""]
    variants = list(dict.fromkeys(r["variant"] for r in records))
    with_oracle = any(r["kind"] == "oracle" for r in records)
    head = ["variant", "user", "target", "recovery", "measure", "plain", "personalized", "change", "prompts moved"]
    if with_oracle:
        head += ["target injected", "change", "prompts moved"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells_of(e: dict | None, plain: bool = True) -> list[str]:
        if not e:
            return ["–"] * (5 if plain else 3)
        ch = f"{100 * e['change']:+.0f}%" if e["change"] is not None else "–"
        return ([e["measure"], f"{e['plain']:.2f}"] if plain else []) + \
            [f"{e['personalized']:.2f}", ch, f"{round(e['moved'] * e['n'])}/{e['n']}"]

    for v in variants:
        rec, eff, orc = recovery(records, v), effects(records, v), effects(records, v, "oracle")
        for user in dict.fromkeys(r["user"] for r in records if r["variant"] == v):
            target = next(r["target"] for r in records if r["user"] == user)
            cells = [v, user, target, f"{100 * rec[user]:.0f}%" if user in rec else "–"]
            if eff.get(user):
                cells += cells_of(eff[user])
            elif orc.get(user):  # no selection run: the measure and plain from the injected answers
                cells += [orc[user]["measure"], f"{orc[user]['plain']:.2f}", "–", "–", "–"]
            else:
                cells += ["–"] * 5
            if with_oracle:
                cells += cells_of(orc.get(user), plain=False)
            lines.append("| " + " | ".join(cells) + " |")
        total = [v, "**all**", "", f"**{100 * rec['all']:.0f}%**" if "all" in rec else "–", "", "", "",
                 f"{sum(e['intended'] for e in eff.values())}/{len(eff)} users in the intended direction"
                 if eff else "", ""]
        if with_oracle:
            total += ["", f"{sum(e['intended'] for e in orc.values())}/{len(orc)} users in the intended "
                          "direction" if orc else "", ""]
        lines.append("| " + " | ".join(total) + " |")
    lines += ["", "Picks per user (attribute: pairs):", ""]
    for v in variants:
        for user in dict.fromkeys(r["user"] for r in records if r["variant"] == v):
            counts: dict[str, int] = {}
            for r in records:
                if r["kind"] == "selection" and r["variant"] == v and r["user"] == user:
                    for a in r["attributes"]:
                        counts[a] = counts.get(a, 0) + 1
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
            lines.append(f"- {v} / {user}: " + ", ".join(f"{a} {c}" for a, c in top))
    return "\n".join(lines) + "\n"
