"""Run a configuration: every (seed, user, method) becomes one JSON line of ``records.jsonl``.

For each seed, users with ``min_pairs..max_pairs`` pairs are sampled (`select_users`) and split 8:2
(`train_test_split`); every method is fitted on the user's training pairs and scores the test pairs
(margin > 0: chosen ranked first). The plain prompt's margins are kept beside each method's for
Table 8. With the win-rate on, each method also samples answers for the user's first test prompts,
and a judge compares them with the reference method's (Base) in both orders.

All methods share one `Memory` (``memory.sqlite`` in the run directory) and so one score cache: a
pair that recurs across seeds, or a request two methods share, is scored once. A record is written
(and fsynced) as soon as it is computed; a restarted run skips the records already there, so an
interrupted run resumes where it stopped.

The score cache is large and stays on the machine that made it; EXACT's per-pair selections are
small and are mirrored into ``selections.jsonl`` after every record and when the run stops. A run
directory copied without its ``memory.sqlite`` (a fresh checkout of committed results) therefore
resumes without re-selecting the pairs it had indexed, including a user's pairs that recur in a
later seed.

    >>> runner = Runner(load_config("quick"), load_backend("fake"), "runs/quick", embedder="hash")
    >>> summary = runner.run()
    >>> summary["accuracy"]                                        # doctest: +SKIP
    {'none': 0.53, 'base': 0.6, 'exact': 0.6, 'exact-global': 0.53}
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from prefsteer.errors import InputError
from prefsteer.types import PreferencePair
from prefsteer.evaluation.metrics import improvement_share, pairwise_accuracy, summarize
from prefsteer.evaluation.protocol import REPO_ROOT, EvalConfig, MethodSpec, check_method_kwargs

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
RUN_INFO = "run.json"
SELECTIONS = "selections.jsonl"


def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def read_records(path: str | Path) -> list[dict]:
    """Records of a run (a directory or its records.jsonl); a torn last line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an unreadable record (an interrupted write?)", path, i)
    return out


def record_key(r: dict) -> tuple:
    return (r["kind"], r["seed"], r["user"], r["method"], r.get("pair_id", ""))


@dataclass
class Job:
    seed: int
    user: str
    train: list[PreferencePair]
    test: list[PreferencePair]


def make_jobs(config: EvalConfig, pairs: Sequence[PreferencePair], seeds: Sequence[int]) -> Iterator[Job]:
    """The protocol's (seed, user, train, test) in order; deterministic given seed and data."""
    from prefsteer.data import group_by_user, select_users, train_test_split

    by_user = group_by_user(pairs)
    for seed in seeds:
        users = select_users(by_user, config.n_users, config.min_pairs, config.max_pairs, seed)
        for user in users:
            train, test = train_test_split(by_user[user], seed, config.test_fraction, config.group_by_prompt)
            if config.max_train_pairs:
                train = train[: config.max_train_pairs]
            if config.max_test_pairs:
                test = test[: config.max_test_pairs]
            yield Job(seed, user, train, test)


class Runner:
    def __init__(self, config: EvalConfig, backend, out_dir: str | Path, *, embedder: Any = None,
                 methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                 judge=None, winrate: bool | None = None, table7: bool | None = None,
                 progress: bool = True, db: str | None = None):
        from prefsteer.attributes import load_library
        from prefsteer.backends.cache import ScoreCache
        from prefsteer.storage import Memory

        self.config, self.backend = config, backend
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seeds = list(seeds) if seeds else list(config.seeds)
        self.specs = self._resolve(methods)
        self.winrate = config.winrate.enabled if winrate is None else winrate
        self.table7 = config.table7.enabled if table7 is None else table7
        self.progress = progress
        self.memory = Memory(db or self.out / "memory.sqlite")
        self.scorer = ScoreCache(backend, self.memory)
        library = load_library()
        self.full_library = library
        self.library = library.subset(config.attributes) if config.attributes else library
        if isinstance(embedder, str) or embedder is None:
            from prefsteer.retrieval import load_embedder

            embedder = load_embedder(embedder)
        self.embedder = embedder
        self._judge = judge
        self._methods: dict[str, Any] = {}
        self.git = git_commit()
        self.path = self.out / RECORDS
        self._check_run_info()
        self.selections_path = self.out / SELECTIONS
        if self.selections_path.exists():
            n = self.memory.import_selections(self.selections_path)
            log.info("imported %d selections from %s", n, self.selections_path)

    # -- set-up ----------------------------------------------------------------------------
    def _resolve(self, names: Sequence[str] | None) -> list[MethodSpec]:
        specs = self._select(names)
        for spec in specs:
            check_method_kwargs(spec)
        return specs

    def _select(self, names: Sequence[str] | None) -> list[MethodSpec]:
        if not names:
            if not self.config.methods:
                raise InputError("the configuration names no methods", field="methods")
            return list(self.config.methods)
        from prefsteer.methods import available_methods

        specs = []
        for n in names:
            try:
                specs.append(self.config.method(n))
            except KeyError:
                if n not in available_methods():
                    raise InputError(f"'{n}' is neither a method label of configuration "
                                     f"'{self.config.name}' ({', '.join(m.label for m in self.config.methods)}) "
                                     f"nor a registered method ({', '.join(available_methods())})",
                                     field="methods") from None
                specs.append(MethodSpec(n))
        return specs

    def _check_run_info(self) -> None:
        info = {"config": self.config.name, "protocol_id": self.config.protocol_id(),
                "model": self.backend.fingerprint}
        p = self.out / RUN_INFO
        if p.exists():
            old = json.loads(p.read_text())
            for k in ("protocol_id", "model"):
                if old.get(k) != info[k]:
                    raise InputError(f"{self.out} holds results of another {'model' if k == 'model' else 'protocol'} "
                                     f"({old.get(k)} != {info[k]}); choose another --out", field="out")
        else:
            p.write_text(json.dumps({**info, "created": _now(), "git": self.git,
                                     "config_json": self.config.to_json()}, indent=2) + "\n")

    @property
    def judge(self):
        if self._judge is None:
            from prefsteer.evaluation.judge import LocalJudge

            w = self.config.winrate
            self._judge = LocalJudge(self.backend, w.judge_pairs, w.judge_chars)
        return self._judge

    def method(self, spec: MethodSpec):
        """One instance per label, built by the registry with the runner's shared resources."""
        if spec.label not in self._methods:
            from prefsteer.methods.registry import Resources, build

            res = Resources(memory=self.memory, embedder=self.embedder, library=self.library,
                            scorer=self.scorer, progress=self.progress)
            self._methods[spec.label] = build(spec.method, self.backend, res, spec.kwargs)
        return self._methods[spec.label]

    # -- records ---------------------------------------------------------------------------
    def _base_record(self, kind: str, seed: int, user: str, method: str) -> dict:
        return {"kind": kind, "seed": seed, "user": user, "method": method,
                "config": self.config.name, "protocol_id": self.config.protocol_id(),
                "model": self.backend.fingerprint, "backend": self.backend.name, "git": self.git,
                "time": _now()}

    def _write(self, rec: dict) -> None:
        rec["config_json"] = self.config.to_json()
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and \
            not self.path.read_bytes()[-1:] == b"\n"
        with self.path.open("a") as fh:
            fh.write(("\n" if needs_newline else "") + json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(rec)
        self._done.add(record_key(rec))
        self.new_records += 1
        self.memory.export_selections(self.selections_path)

    # -- the run ---------------------------------------------------------------------------
    def run(self, max_records: int | None = None) -> dict:
        """Compute what is missing; stop after ``max_records`` new records (a simulated kill)."""
        from tqdm.auto import tqdm

        from prefsteer.data import load_pairs

        start = time.perf_counter()
        pairs = load_pairs(self.config.data_path(), self.config.format)
        jobs = list(make_jobs(self.config, pairs, self.seeds))
        if not jobs:
            raise InputError(f"no user of {self.config.data} has {self.config.min_pairs}.."
                             f"{self.config.max_pairs} pairs", field="data")
        self.records = read_records(self.path)
        self._done = {record_key(r) for r in self.records}
        self.new_records = 0
        t7_pairs = self._table7_pairs(jobs) if self.table7 else []
        # a user's pair that recurs in another seed's split was already studied: its record stands
        studied = {(k[2], k[4]) for k in self._done if k[0] == "table7"}
        total = len(jobs) * len(self.specs) + len(t7_pairs)
        bar = tqdm(total=total, desc=f"eval {self.config.name}", unit="rec", disable=not self.progress)
        try:
            for job in jobs:
                for spec in self.specs:
                    if max_records is not None and self.new_records >= max_records:
                        return self.summary(start)
                    bar.set_postfix_str(f"seed {job.seed} {job.user[:10]} {spec.label}")
                    if ("method", job.seed, job.user, spec.label, "") not in self._done:
                        self._write(self.evaluate(job, spec))
                    bar.update()
                if self.winrate:
                    self._winrates(job, max_records)
            for job, pair in t7_pairs:
                if max_records is not None and self.new_records >= max_records:
                    return self.summary(start)
                if (job.user, pair.pair_id) not in studied:
                    self._write(self.table7_record(job, pair))
                bar.update()
        finally:
            bar.close()
            self.memory.export_selections(self.selections_path)  # an interrupted user's pairs too
        return self.summary(start)

    def summary(self, start: float) -> dict:
        labels = {s.label for s in self.specs}
        mine = [r for r in self.records if r["seed"] in self.seeds and
                (r["kind"] == "table7" or r["method"] in labels)]
        out = {"config": self.config.name, "out": str(self.out), "model": self.backend.fingerprint,
               "git": self.git, "seeds": self.seeds}
        out.update(summarize(mine))
        out.update({"records": len(mine), "new_records": self.new_records,
                    "elapsed_seconds": round(time.perf_counter() - start, 2),
                    "cache": {"hits": self.scorer.hits, "misses": self.scorer.misses}})
        return out

    def plain_margins(self, test: Sequence[PreferencePair]) -> list[float]:
        from prefsteer.methods.plain import plain_margins

        return plain_margins(self.scorer, test)

    def evaluate(self, job: Job, spec: MethodSpec) -> dict:
        method = self.method(spec)
        timings: dict[str, float] = {}
        # the split's training pairs are stored and fitted on; a method learns from these only,
        # never from pairs of another seed's split (those may be this split's test pairs)
        self.memory.add_pairs(job.train)
        t = time.perf_counter()
        method.fit(job.user, job.train)
        timings["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        margins = [float(m) for m in method.margins(job.user, job.test)]
        timings["margins"] = time.perf_counter() - t
        plain = self.plain_margins(job.test)  # cached: free after the first method
        rec = self._base_record("method", job.seed, job.user, spec.label)
        rec.update({"registry": spec.method, "kwargs": spec.kwargs, "n_train": len(job.train),
                    "n_test": len(job.test), "train_ids": [p.pair_id for p in job.train],
                    "test_ids": [p.pair_id for p in job.test], "margins": margins,
                    "plain_margins": plain, "accuracy": pairwise_accuracy(margins),
                    "table8": improvement_share(margins, plain)})
        if hasattr(method, "attributes_for"):
            try:
                rec["attributes"] = method.attributes_for(job.user, [p.prompt for p in job.test])
            except Exception:  # noqa: BLE001 - informative only
                pass
        if self.winrate:
            from prefsteer.backends.base import GenerationConfig

            w = self.config.winrate
            prompts = self._gen_prompts(job)
            cfg = GenerationConfig(max_new_tokens=w.max_new_tokens, do_sample=True, temperature=w.temperature,
                                   top_k=w.top_k, top_p=w.top_p, seed=job.seed)
            t = time.perf_counter()
            outs = method.generate(job.user, prompts, cfg)
            timings["generate"] = time.perf_counter() - t
            rec["generations"] = [o.text for o in outs]
        rec["timings"] = {k: round(v, 3) for k, v in timings.items()}
        return rec

    def _gen_prompts(self, job: Job) -> list[str]:
        return list(dict.fromkeys(p.prompt for p in job.test))[: self.config.winrate.n_prompts]

    def _winrates(self, job: Job, max_records: int | None) -> None:
        from prefsteer.evaluation.judge import compare

        ref = self.config.winrate.reference
        gens = {r["method"]: r.get("generations") for r in self.records
                if r["kind"] == "method" and r["seed"] == job.seed and r["user"] == job.user}
        if not gens.get(ref):
            log.warning("win-rate: no generations of the reference '%s' for seed %s user %s; skipped",
                        ref, job.seed, job.user)
            return
        prompts = self._gen_prompts(job)
        for spec in self.specs:
            if spec.label == ref or not gens.get(spec.label):
                continue
            if ("winrate", job.seed, job.user, spec.label, "") in self._done:
                continue
            if max_records is not None and self.new_records >= max_records:
                return
            t = time.perf_counter()
            results = [compare(self.judge, job.train, p, m, b)
                       for p, m, b in zip(prompts, gens[spec.label], gens[ref])]
            rec = self._base_record("winrate", job.seed, job.user, spec.label)
            rec.update({"reference": ref, "judge": self.judge.name, "n_prompts": len(results),
                        "per_prompt": [r[0] for r in results],
                        "preferences": [[r[1], r[2]] for r in results],
                        "winrate": sum(r[0] for r in results) / len(results),
                        "timings": {"judge": round(time.perf_counter() - t, 3)}})
            self._write(rec)

    # -- Table 7 ---------------------------------------------------------------------------
    def _table7_pairs(self, jobs: list[Job]) -> list[tuple[Job, PreferencePair]]:
        """Training pairs of the first seed's users, taken round-robin, ``n_pairs`` in all."""
        first = [j for j in jobs if j.seed == self.seeds[0]]
        out: list[tuple[Job, PreferencePair]] = []
        i = 0
        while len(out) < self.config.table7.n_pairs and any(i < len(j.train) for j in first):
            out += [(j, j.train[i]) for j in first if i < len(j.train)]
            i += 1
        return out[: self.config.table7.n_pairs]

    def table7_record(self, job: Job, pair: PreferencePair) -> dict:
        from prefsteer.methods.exact.select import exhaustive_select, greedy_select, make_objective

        c = self.config.table7
        lib = self.full_library.subset(list(self.full_library.names[: c.library_size]))
        objective = make_objective(self.scorer, pair.prompt, pair.chosen, pair.rejected, lib)
        t = time.perf_counter()
        g = greedy_select(objective, lib.names, c.k)
        tg = time.perf_counter() - t
        t = time.perf_counter()
        e = exhaustive_select(objective, lib.names, c.k, ordered=c.ordered)
        te = time.perf_counter() - t
        # the subsets in library order are among the ordered tuples: served by the score cache
        u = exhaustive_select(objective, lib.names, c.k) if c.ordered else e
        rec = self._base_record("table7", job.seed, job.user, "greedy-vs-exhaustive")
        rec.update({"pair_id": pair.pair_id, "k": c.k, "library_size": len(lib),
                    "library": list(lib.names), "base": g.base_objective, "greedy": g.objective,
                    "exhaustive": e.objective, "greedy_set": list(g.attributes), "ordered": c.ordered,
                    "exhaustive_set": list(e.attributes), "exhaustive_unordered": u.objective,
                    "exhaustive_unordered_set": list(u.attributes), "greedy_evaluations": g.evaluations,
                    "exhaustive_evaluations": e.evaluations,
                    "timings": {"greedy": round(tg, 3), "exhaustive": round(te, 3)}})
        return rec


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
