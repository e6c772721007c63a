"""EXACT as a method: index a user's pairs (Algorithm 1), retrieve and inject (Algorithm 2).

    >>> exact = Exact(backend, memory=Memory("memory.db"), embedder=load_embedder())
    >>> memory.add_pairs(pairs)                    # the caller stores the pairs
    >>> exact.fit("alice", pairs)                  # resumable; publishes alice's index at the end
    >>> exact.generate("alice", ["Write a TL;DR of ..."])[0].attributes
    ['Concise', 'Direct', 'Formal']
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from prefsteer.attributes import (PLACEMENTS, RENDER_STYLES, AttributeLibrary, attribute_conversation,
                                  load_library)
from prefsteer.backends.base import GenerationConfig, Messages, ScoreRequest, require
from prefsteer.retrieval import Embedder, load_embedder, nearest
from prefsteer.methods.exact.select import (OBJECTIVES, SELECTORS, Selection, greedy_select, make_objective,
                                            screened_greedy_select)
from prefsteer.backends.cache import ScoreCache
from prefsteer.storage import Entry, Memory
from prefsteer.types import PreferencePair, sha, with_id
from prefsteer.methods.base import (Decoding, Method, NotFittedError, config_from_options, last_user_turn,
                                    register_method)

log = logging.getLogger(__name__)

# (database, user, config id) whose entries from other settings were logged: once per process, not
# once per method object (the service builds one per request thread, and threads come and go)
_TOLD: set[tuple[str, str, str]] = set()


# Named settings of the levers below. "paper" is the paper's (bare names appended to the user's turn,
# the summed objective, no filter): ExactConfig()'s defaults, and what every evaluation configuration
# (quick, paper*, table*) runs. "product" is what the `prefsteer` command line, `prefsteer serve` and
# the demo use unless told otherwise, chosen by measurement (results/known-answer/README.md): an
# instruction sentence in the user's turn, where the 135M model follows an injected style on 5 of the
# 6 known-answer styles (3 of 6 from the system prompt), and which moved the most users the intended
# way end to end (4 of 6 on known-answer-16).
EXACT_PRESETS: dict[str, dict] = {
    "paper": {"render": "names", "placement": "user", "objective": "sum"},
    "product": {"render": "instruction", "placement": "user", "objective": "sum"},
}
PAPER_PRESET, PRODUCT_PRESET = "paper", "product"

# exact-global's ways to find its one set (`ExactGlobal`): "greedy" is the default (the set stored
# before this option existed), "best-entry" the paper's Table 8 reading
GLOBAL_MODES = ("greedy", "best-entry", "best-mean")


@dataclass
class ExactConfig:
    k: int = field(default=3, metadata={"help": "attributes selected per preference pair"})
    mode: str = field(default="greedy", metadata={
        "help": "attribute search: greedy, lazy (lazy greedy: see benchmarks/lazy_greedy.py), screened "
                "(greedy that scores only the screen's best candidates: benchmarks/screened_greedy.py) "
                "or exhaustive"})
    stop_when_no_gain: bool = field(default=False, metadata={
        "help": "stop adding attributes once none raises the objective (the paper's non-negativity "
                "filter, Appendix B.1.2)"})
    preset: str = field(default=PAPER_PRESET, metadata={
        "help": "named settings of render, placement and objective, each overridden by its own option: "
                "paper (bare names in the user's turn, summed objective: the paper's) or product (an "
                "instruction sentence in the user's turn: the measured best; the command line's default)"})
    describe: bool = field(default=False, metadata={
        "help": "render attributes with their one-line descriptions, not bare names (= render described)"})
    render: str | None = field(default=None, metadata={
        "help": "how the attributes are written: names ('Attributes: <Concise, Formal>', the paper), "
                "described (each with its description) or instruction ('Answer in a way that is: "
                "concise, formal.') or instruction-described (the sentence with the descriptions: 'Answer in a "
                "way that is short and to the point, no filler.'); unset: the preset's"})
    placement: str | None = field(default=None, metadata={
        "help": "where the attribute line goes: user (appended to the user's turn, the paper) or system "
                "(the system prompt); unset: the preset's"})
    objective: str | None = field(default=None, metadata={
        "help": "F per pair: sum (summed log-probability gap, the paper) or mean (gap of per-token means, "
                "less weight on the responses' lengths); unset: the preset's"})
    system: str | None = field(default=None, metadata={"help": "system prompt for scoring and generation"})
    global_pairs: int = field(default=0, metadata={
        "help": "exact-global: training pairs its global greedy search scores (0: all; global_mode greedy only)"})
    global_mode: str = field(default="greedy", metadata={
        "help": "exact-global: how the one set is found: greedy (greedy search on the objective summed over "
                "the training pairs), best-entry (the paper's Table 8 reading: of the sets EXACT selected "
                "per training pair, the one with the highest objective on its own pair) or best-mean (of "
                "those sets, the one with the highest mean objective over all training pairs)"})
    screen_top: int = field(default=8, metadata={
        "help": "screened: candidates per step that the model itself scores, the screen's best"})
    screen_dtype: str = field(default="bfloat16", metadata={
        "help": "screened: the precision of the model copy that ranks every candidate"})

    def __post_init__(self):
        if self.preset not in EXACT_PRESETS:
            raise ValueError(f"`preset` (={self.preset!r}) has to be one of {', '.join(EXACT_PRESETS)}")
        if self.describe and self.render is None:  # `describe` asks for the described rendering
            self.render = "described"
        for key, value in EXACT_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.k < 1:
            raise ValueError(f"`k` (={self.k}) has to be at least 1")
        if self.mode not in SELECTORS:
            raise ValueError(f"`mode` (={self.mode!r}) has to be one of {', '.join(SELECTORS)}")
        if self.screen_top < 1:
            raise ValueError(f"`screen_top` (={self.screen_top}) has to be at least 1")
        if self.screen_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"`screen_dtype` (={self.screen_dtype!r}) has to be bfloat16, float16 or float32")
        if self.render not in RENDER_STYLES:
            raise ValueError(f"`render` (={self.render!r}) has to be one of {', '.join(RENDER_STYLES)}")
        if self.describe and self.render in ("instruction", "instruction-described"):
            raise ValueError("`describe` renders names with descriptions; it cannot go with `render` "
                             f"(={self.render!r})")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"`placement` (={self.placement!r}) has to be one of {', '.join(PLACEMENTS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` (={self.objective!r}) has to be one of {', '.join(OBJECTIVES)}")
        if self.global_mode not in GLOBAL_MODES:
            raise ValueError(f"`global_mode` (={self.global_mode!r}) has to be one of {', '.join(GLOBAL_MODES)}")
        if self.global_pairs < 0:
            raise ValueError(f"`global_pairs` (={self.global_pairs}) has to be non-negative")
        if self.global_pairs and self.global_mode != "greedy":
            raise ValueError(f"`global_pairs` (={self.global_pairs}) applies to `global_mode` 'greedy' only; "
                             f"'{self.global_mode}' uses every training pair")

    @classmethod
    def of_preset(cls, name: str, **overrides) -> "ExactConfig":
        """``ExactConfig.of_preset("paper")`` (= ``ExactConfig()``), ``of_preset("product", k=2)``."""
        return cls(preset=name, **overrides)

    @property
    def style(self) -> str:
        """The rendering in effect: ``describe=True`` is ``render="described"``."""
        return "described" if self.describe else self.render




@register_method("exact")
class Exact(Method):
    """`fit` builds the user's retrievable memory from exactly the pairs it is given (the caller
    stores them: `prefsteer index` passes all the user's stored pairs, an evaluation split only its
    training pairs); `feedback` adds pairs one by one without touching the others."""

    config_class = ExactConfig
    resources = ("memory", "embedder", "library", "progress")
    option_prefix = ""  # --k, --mode, --preset, ...
    selects_per_pair = True

    def __init__(self, backend, memory: Memory | None = None, embedder: Embedder | str | None = None,
                 library: AttributeLibrary | str | None = None, config: ExactConfig | None = None,
                 progress: bool = False, **options):
        cfg = config_from_options(ExactConfig, options, self.name or "exact", config)
        super().__init__(backend, **options)
        self.memory = memory if memory is not None else Memory(":memory:")
        self._embedder = embedder
        self.library = library if isinstance(library, AttributeLibrary) else load_library(library)
        self.config = cfg
        self.scorer = ScoreCache(backend, self.memory)
        self._screen: ScoreCache | None = None
        self.progress = progress

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None or isinstance(self._embedder, str):
            self._embedder = load_embedder(self._embedder)
        return self._embedder

    @property
    def screen(self) -> ScoreCache:
        """The scorer that ranks candidates for ``mode="screened"``: the model cast to
        ``screen_dtype`` (its own fingerprint, so its scores are cached apart)."""
        if self._screen is None:
            require(self.backend, "cast", "EXACT's screened mode (use another --mode)")
            self._screen = ScoreCache(self.backend.cast(self.config.screen_dtype), self.memory)
        return self._screen

    def _objectives(self, pair: PreferencePair):
        """The pair's F under the model, and under the screen (None unless ``mode="screened"``)."""
        c = self.config
        args = (pair.prompt, pair.chosen, pair.rejected, self.library, False, c.system)
        kw = {"style": c.style, "placement": c.placement, "objective": c.objective}
        screen = make_objective(self.screen, *args, **kw) if c.mode == "screened" else None
        return make_objective(self.scorer, *args, **kw), screen

    @property
    def config_id(self) -> str:
        """Selections are reused only under the same model, template, library and search settings."""
        return self._config_id(self.config.k)

    def _config_id(self, k: int) -> str:
        c = asdict(self.config)
        # exact-global's options choose among the per-pair selections, they do not change them; the
        # preset is only a name for the values below
        c.pop("global_pairs"), c.pop("global_mode"), c.pop("preset")
        if c["mode"] != "screened":  # ids of the other modes stay what they were before screening
            c.pop("screen_top"), c.pop("screen_dtype")
        # the levers added later enter the id only when set, so stored selections stay valid;
        # render="described" is describe=True and shares its selections
        c["describe"] = self.config.style == "described"
        for key, paper in (("render", "names"), ("placement", "user"), ("objective", "sum")):
            if c[key] == paper or key == "render" and c[key] == "described":
                c.pop(key)
        c["k"] = k
        return sha(self.backend.fingerprint, self.backend.template_id, self.library.name,
                   [(a.name, a.description) for a in self.library.attributes], c)[:16]

    # -- offline ---------------------------------------------------------------------------
    def select(self, pair: PreferencePair) -> Selection:
        objective, screen = self._objectives(pair)
        if self.config.mode == "greedy":
            return greedy_select(objective, self.library.names, self.config.k, self.config.stop_when_no_gain,
                                 start=self._greedy_start(pair))
        kw = {"stop_when_no_gain": self.config.stop_when_no_gain} if self.config.mode != "exhaustive" else {}
        if screen is not None:
            kw.update(screen=screen, top=self.config.screen_top)
        return SELECTORS[self.config.mode](objective, self.library.names, self.config.k, **kw)

    def _greedy_start(self, pair: PreferencePair) -> Selection | None:
        """A stored greedy selection of this pair under the same settings but another k: the
        shortest one at least k long (cut to k, nothing scored), else the longest shorter one
        (continued). Figure 1's k = 1, 3, 5, 10 thus cost what k = 10 alone costs."""
        if self.config.stop_when_no_gain:  # an early stop says nothing about longer searches
            return None
        ids = {self._config_id(j): j for j in range(1, len(self.library) + 1) if j != self.config.k}
        found = {ids[c]: s for c, s in self.memory.selections_of(pair.user_id, pair.pair_id, list(ids)).items()}
        if not found:
            return None
        longer = [j for j in found if j > self.config.k]
        j = min(longer) if longer else max(found)
        s = found[j]
        return Selection(tuple(s["attributes"]), s["objective"], s["base_objective"], s["gains"])

    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        """Index the pairs. Each pair's selection is saved as soon as it is made, so an interrupted
        run resumes where it stopped; the user's retrievable entries are rebuilt from ``pairs`` in
        one transaction at the end."""
        from tqdm.auto import tqdm

        self.memory.require_user(user_id)  # the caller stores the user's pairs first
        mark = self.memory.pair_mark(user_id)  # pairs stored after this are feedback given meanwhile
        pool = [with_id(p) for p in pairs]
        self.memory.set_status(user_id, "indexing")
        cid = self.config_id
        best: dict[str, Entry] = {}
        for p in tqdm(pool, desc=f"indexing {user_id}", unit="pair", disable=not self.progress, leave=False):
            sel = self.stored_selection(user_id, p)
            if p.prompt not in best or sel["objective"] > best[p.prompt].objective:
                best[p.prompt] = Entry(user_id, p.prompt, p.pair_id, config_id=cid, **sel)
        entries = list(best.values())
        self._embed(entries)
        with self.memory.transaction():
            self.memory.put_entries(user_id, entries, replace_all=True, keep_after=mark)
            self.memory.set_status(user_id, "ready")

    def stored_selection(self, user_id: str, pair: PreferencePair) -> dict:
        """The pair's selection under this configuration: the stored one, else selected now
        (Algorithm 1) and stored, so an interrupted run resumes where it stopped."""
        cid = self.config_id
        sel = self.memory.selection(user_id, pair.pair_id, cid)
        if sel is None:
            s = self.select(pair)
            sel = {"attributes": list(s.attributes), "objective": s.objective,
                   "base_objective": s.base_objective, "gains": s.gains}
            self.memory.put_selection(user_id, pair.pair_id, cid, **sel)
        return sel

    def length_contexts(self, pair: PreferencePair) -> list[list[dict]]:
        """The pair's prompt with the k attributes whose rendering is longest, injected as this
        configuration says: the longest context selection can score."""
        from prefsteer.attributes import render

        lib = self.library
        longest = sorted(lib.names, key=lambda n: len(render([n], lib, style=self.config.style)),
                         reverse=True)[:self.config.k]
        return [self.attribute_messages(pair.prompt, longest)]

    def learned(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[dict]:
        """Each pair's stored selection under this configuration (what `feedback` added)."""
        return [{"user_id": user_id, "prompt": p.prompt, "pair_id": p.pair_id,
                 **(self.memory.selection(user_id, p.pair_id, self.config_id) or {})} for p in map(with_id, pairs)]

    def warm_up(self) -> None:
        self.embedder.encode(["warm-up"])

    def summary(self, user_id: str) -> dict:
        return {"entries": len(self.memory.entries(user_id))}

    def add_feedback(self, pair: PreferencePair) -> Entry:
        """Index one stored pair without re-indexing the others: selected first, then its selection
        and its entry are stored in one transaction (a failure stores nothing). A pair already
        selected under this configuration is not selected again, so a job interrupted midway
        resumes for the cost of the pairs it had not reached."""
        pair = with_id(pair)
        cid = self.config_id
        sel = self.memory.selection(pair.user_id, pair.pair_id, cid)
        if sel is None:
            s = self.select(pair)
            sel = {"attributes": list(s.attributes), "objective": s.objective,
                   "base_objective": s.base_objective, "gains": s.gains}
        entry = Entry(pair.user_id, pair.prompt, pair.pair_id, config_id=cid, **sel)
        self._embed([entry])
        with self.memory.transaction():
            self.memory.put_selection(pair.user_id, pair.pair_id, cid, **sel)
            self.memory.put_entries(pair.user_id, [entry])
            if self.memory.user_status(pair.user_id) == "new":
                self.memory.set_status(pair.user_id, "ready")
        return entry

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        for p in pairs:
            self.add_feedback(p)
        return "indexed"

    def profile(self, user_id: str) -> dict:
        entries = self.memory.entries(user_id)
        return {"method": self.name, "fitted": bool(entries), "entries": [e.to_json() for e in entries]}

    def _embed(self, entries: Sequence[Entry]) -> None:
        if entries:
            vecs = self.embedder.encode([e.prompt for e in entries])
            for e, v in zip(entries, vecs):
                e.embedder, e.embedding = self.embedder.name, v

    # -- online ----------------------------------------------------------------------------
    def retrieve(self, user_id: str, prompts: Sequence[str]) -> list[tuple[Entry, float]]:
        """For each prompt, the user's most similar past prompt (cosine) and its similarity."""
        if user_id is None:
            raise NotFittedError(self.name, None)
        entries = [e for e in self.memory.entries(user_id) if e.embedder == self.embedder.name]
        if not entries:
            self.memory.require_user(user_id)
            raise NotFittedError(self.name, user_id, hint=f"no memory entries for embedder '{self.embedder.name}'")
        other = {e.config_id for e in entries} - {self.config_id, None, ""}
        told = (self.memory.db, user_id, self.config_id)
        if other and told not in _TOLD:
            _TOLD.add(told)
            log.warning("user '%s': %d of %d memory entries were selected under other EXACT settings (%s), "
                        "not this configuration's (%s); they are injected as they are. `prefsteer index` "
                        "re-selects them under these settings", user_id,
                        sum(e.config_id in other for e in entries), len(entries), ", ".join(sorted(other)),
                        self.config_id)
        corpus = np.stack([e.embedding for e in entries])  # (N, d)
        out = []
        for q in self.embedder.encode(prompts):
            i, sim = nearest(q, corpus)
            out.append((entries[i], sim))
        return out

    def attributes_for(self, user_id: str, prompts: Sequence[str]) -> list[list[str]]:
        return [e.attributes for e, _ in self.retrieve(user_id, prompts)]

    def attribute_messages(self, prompt: str | Sequence[dict], attrs: Sequence[str]) -> list[dict]:
        """The chat context of ``prompt`` (or of a conversation, a list of messages ending with the
        user's turn) with ``attrs`` rendered and placed as this configuration says: what selection
        scored is what generation sees. Every path that injects attributes (generation, the CLI's
        ``--attributes``, the service's chat, the length check) builds its context here."""
        c = self.config
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return attribute_conversation(msgs, attrs, self.library, style=c.style, placement=c.placement,
                                      system=c.system)

    @staticmethod
    def context_info(msgs: Sequence[dict]) -> dict:
        """What a generation's output reports of its context: the user's turn, and the system prompt
        when there is one."""
        return {"prompt": msgs[-1]["content"],
                **({"system": msgs[0]["content"]} if len(msgs) > 1 and msgs[0]["role"] == "system" else {})}

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        """Summed log-probability margins under the retrieved attributes (the protocol's pairwise
        accuracy, whatever ``objective`` selection used)."""
        attrs = self.attributes_for(user_id, [p.prompt for p in pairs])
        reqs = []
        for p, a in zip(pairs, attrs):
            msgs = self.attribute_messages(p.prompt, a)
            reqs += [ScoreRequest.of(msgs, p.chosen), ScoreRequest.of(msgs, p.rejected)]
        s = self.scorer.score(reqs)
        return [w.logprob - l.logprob for w, l in zip(s[0::2], s[1::2])]

    def _retrieved(self, user_id: str | None, prompts: Sequence[str]) -> list[tuple[list[str], dict]]:
        """For each prompt: the attributes to inject, and what the output reports of where they came from."""
        return [(list(e.attributes), {"retrieved": {"prompt": e.prompt, "similarity": round(float(sim), 4)}})
                for e, sim in self.retrieve(user_id, prompts)]

    def decodings(self, user_id: str | None, conversations: list[Messages],
                  config: GenerationConfig) -> list[Decoding]:
        """Retrieval on each conversation's last user turn; the attributes are rendered and placed
        (that turn, or the system prompt) as the configuration says."""
        start = time.perf_counter()
        found = self._retrieved(user_id, [last_user_turn(c) for c in conversations])
        contexts = [self.attribute_messages(c, a) for c, (a, _) in zip(conversations, found)]
        overhead = time.perf_counter() - start  # embedding + retrieval + injection
        return [Decoding(c, None, a, {"retrieval": overhead}, {**self.context_info(c), **why})
                for (a, why), c in zip(found, contexts)]


@register_method("exact-global")
class ExactGlobal(Exact):
    """EXACT without retrieval (the paper's Table 8): one attribute set per user, injected into every
    prompt. The set is saved with `save_state`, so another process generates without a fit.
    ``global_mode`` says how the set is found:

    * ``"greedy"`` (the default, and what exact-global did before the option existed): greedy (or
      screened greedy in ``mode="screened"``) on the objective summed over the training pairs, or
      over ``global_pairs`` of them drawn at random: Eq. (13)'s maximisation of F (Eq. 12) over all
      sets of at most k attributes.
    * ``"best-entry"``: the paper's non-retrieval variant as this project reads Appendix C.5.2 ("always
      injects the single attribute set that achieves the highest objective score on the training
      data"): of the sets EXACT selected for the user's training pairs (Algorithm 1), the one whose
      objective (Eq. 11, F(A) on its own pair) is highest. The paper builds both variants from the
      same prompt-attribute index ("can be instantiated in two ways"), and that index already keeps,
      per prompt, "the attribute subset that attains the largest objective value in Eq. (11)" (§4.1):
      the non-retrieval set is that rule applied over all the user's training data, so this is the
      retrieval index's entry with the largest objective. Ties go to the earliest pair. It is
      Eq. (11)'s value, not the gain over the plain prompt (objective - base_objective), that ranks,
      as in the index's own rule.
    * ``"best-mean"``: the other reading of "on the training data": each of those per-prompt sets
      scored on every training pair, the highest mean objective (F of Eq. 12, up to the plain prompt's
      terms, which every set shares). It costs a score of every set on every pair (the cache answers
      a set on its own pair).

    Both paper readings reuse EXACT's stored selections (the same `config_id` as `exact` with the
    same settings, whatever ``global_mode``): a pair already selected is not selected again, and a pair
    selected here is stored for `exact`."""

    selects_per_pair = False

    def state_options(self) -> dict:
        """The stored set depends on ``global_mode``; its default leaves the id what it was before the
        option existed, so the states stored then are still served."""
        opts = super().state_options()
        if opts.get("global_mode") == "greedy":
            opts.pop("global_mode")
        return opts

    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        pool = [with_id(p) for p in pairs]
        if self.config.global_mode != "greedy":
            if not pool:
                raise ValueError(f"exact-global (global_mode '{self.config.global_mode}') needs at least one "
                                 f"training pair for user '{user_id}'")
            self._fit_among_selections(user_id, pool)
            return
        n = self.config.global_pairs
        subset = list(pool) if not n or n >= len(pool) else \
            [pool[i] for i in np.random.default_rng(0).choice(len(pool), n, replace=False)]
        objectives = [self._objectives(p) for p in subset]

        def summed(which: int):
            return lambda sets: list(np.sum([f[which](sets) for f in objectives], axis=0))

        if self.config.mode == "screened":
            self.selection = screened_greedy_select(summed(0), self.library.names, self.config.k,
                                                    self.config.stop_when_no_gain, screen=summed(1),
                                                    top=self.config.screen_top)
        else:
            self.selection = greedy_select(summed(0), self.library.names, self.config.k,
                                           self.config.stop_when_no_gain)
        self._store(user_id, {"pairs": [p.pair_id for p in subset]}, len(pool))

    def _store(self, user_id: str, extra: dict, n_pairs: int) -> None:
        self.global_sets = getattr(self, "global_sets", {})
        self.global_sets[user_id] = list(self.selection.attributes)
        self.save_state(user_id, {"attributes": list(self.selection.attributes),
                                  "objective": float(self.selection.objective),
                                  "base_objective": float(self.selection.base_objective),
                                  "gains": [float(g) for g in self.selection.gains], **extra}, n_pairs=n_pairs)

    def pair_selections(self, user_id: str, pool: Sequence[PreferencePair]) -> list[dict]:
        """Each pair's EXACT selection under this configuration (`Exact.stored_selection`)."""
        return [self.stored_selection(user_id, p) for p in pool]

    def _fit_among_selections(self, user_id: str, pool: list[PreferencePair]) -> None:
        """``global_mode`` best-entry or best-mean: the one set among the user's index entries."""
        sels = self.pair_selections(user_id, pool)
        best: dict[str, int] = {}  # the index's rule: per prompt, the pair whose selection scores highest
        for i, (p, s) in enumerate(zip(pool, sels)):
            if p.prompt not in best or s["objective"] > sels[best[p.prompt]]["objective"]:
                best[p.prompt] = i
        entries = sorted(best.values())
        if self.config.global_mode == "best-entry":
            i = max(entries, key=lambda j: sels[j]["objective"])  # the first of equals
            s = sels[i]
            self.selection = Selection(tuple(s["attributes"]), s["objective"], s["base_objective"],
                                       list(s["gains"]), 0)
            self._store(user_id, {"global_mode": "best-entry", "pair": pool[i].pair_id,
                                  "pairs": [p.pair_id for p in pool]}, len(pool))
            return
        sets = list(dict.fromkeys(tuple(sels[i]["attributes"]) for i in entries))
        values = np.array([self._objectives(p)[0](sets) for p in pool])  # (pairs, sets)
        means = values.mean(axis=0)                                        # (sets,)
        j = int(np.argmax(means))  # the first of equals
        base = float(np.mean([s["base_objective"] for s in sels]))
        self.selection = Selection(sets[j], float(means[j]), base, [], values.size)
        self._store(user_id, {"global_mode": "best-mean", "pairs": [p.pair_id for p in pool],
                              "candidates": [{"attributes": list(a), "objective": float(m)}
                                             for a, m in zip(sets, means)]}, len(pool))

    def attributes_for(self, user_id: str | None, prompts: Sequence[str]) -> list[list[str]]:
        if user_id is None:
            raise NotFittedError(self.name, None)
        sets = getattr(self, "global_sets", {})
        if user_id not in sets:
            st = self.load_state(user_id)
            if st is None:
                self.memory.require_user(user_id)
                raise NotFittedError(self.name, user_id)
            sets[user_id] = list(st["state"]["attributes"])
            self.global_sets = sets
        return [sets[user_id]] * len(prompts)

    def _retrieved(self, user_id: str | None, prompts: Sequence[str]) -> list[tuple[list[str], dict]]:
        return [(list(a), {}) for a in self.attributes_for(user_id, prompts)]

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        return Method.feedback(self, user_id, pairs)  # one set over all pairs: fit again

    def summary(self, user_id: str) -> dict:
        return {"attributes": self.attributes_for(user_id, [""])[0]}

    def profile(self, user_id: str) -> dict:
        return Method.profile(self, user_id)
