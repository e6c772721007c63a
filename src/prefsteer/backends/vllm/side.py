"""The side model of guided decoding on vLLM, free of vLLM: rows that follow vLLM's requests.

vLLM's logits processors see logits and token ids, never hidden states; CLIPer's heads need the
last hidden state the next token is predicted from. `GuidedRequests` keeps, for every guided
request, a row of the side model (the hf backend, `prefsteer.backends.hf`) that has read the same
tokens as the request, and turns vLLM's logits into guided ones with the guide the request's
description rebuilds (`CliperGuide.from_description`), i.e. the same top-k, heads and
`guided_logits` as CLIPer on the hf backend. Drift's branches (each attribute's context, and the
plain one when it is not the request's) are rows of the same kind, each reading its own context and
then the request's tokens; their next-token log-probabilities mix into the engine's as in Drift on
the hf backend (`DriftGuide.combine`, i.e. `combine_logits`).

All the rows of one side model are one `SideRows` group on one key/value cache, so that a step of
the side model is one forward whatever the number of requests, as the engine's own step is. Rows
that arrive in the same engine step are prefilled together, left-padded, and then laid beside the
running rows (as the hf scheduler's `KVBatch` does). At each step every row may read any number of
new tokens, none included (a request still being prefilled in chunks, or not scheduled): the group
reads a block of ``q`` columns, each row's tokens right-aligned in it and the rest masked out, so
one forward serves the group whatever its rows' progress. The rows of a request that ended leave
the cache at once.

Nothing here knows vLLM: `prefsteer.backends.vllm.processor` feeds it from vLLM's batch updates,
and the tests drive it with the hf backend's own logits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

# check_description: re-exported (the processor's check of a request's description)
from prefsteer.backends.guides import check_description, guide_kind, kind_of  # noqa: F401

log = logging.getLogger(__name__)

GUIDE_KEY = "prefsteer_guide"  # where a request's guide description travels in SamplingParams.extra_args


class SideRows:
    """Rows of the side model ``b`` (a `TransformersBackend`) on one key/value cache, each
    advanced by its own number of tokens per step."""

    def __init__(self, b, prompts: Sequence[Sequence[int]]):
        from prefsteer.backends.hf.kvcache import growing_cache
        from prefsteer.backends.hf.packing import decoding
        from prefsteer.backends.hf.planner import left_pad

        self.b = b
        dev = b.device
        ids, mask = left_pad([list(p) for p in prompts], b.pad_id)
        self.mask = mask.to(dev)                                         # (R, K): real keys
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.pos = positions[:, -1].clone()                              # (R,): last token's position
        self.read = [len(p) for p in prompts]                            # tokens each row has read
        self.cache = growing_cache(b.config)
        with torch.inference_mode(), decoding():  # the packed products, as for its steps (`packing`)
            out = b.extend(self.cache, input_ids=ids.to(dev), attention_mask=self.mask, position_ids=positions)
        self.hidden = out.last_hidden_state[:, -1].float()               # (R, d)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def join(self, other: "SideRows") -> None:
        """Take ``other``'s rows (of the same side model) after this group's, on this group's cache."""
        from prefsteer.backends.hf.batch import join_rows

        self.mask = join_rows(self.cache, self.mask, other.cache, other.mask)
        self.pos = torch.cat([self.pos, other.pos])
        self.hidden = torch.cat([self.hidden, other.hidden])
        self.read += other.read

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (ascending), dropping the others' keys and values."""
        from prefsteer.backends.hf.batch import keep_rows

        if len(rows) == self.rows:
            return
        idx = torch.tensor(list(rows), device=self.mask.device)
        self.pos, self.hidden = self.pos[idx], self.hidden[idx]
        self.mask = keep_rows(self.cache, self.mask, idx)
        self.read = [self.read[r] for r in rows]

    def advance(self, new: dict[int, Sequence[int]]) -> None:
        """Row r reads ``new[r]`` (rows not in ``new``, or with no tokens, read nothing)."""
        from prefsteer.backends.hf.packing import decoding

        new = {r: [int(t) for t in toks] for r, toks in new.items() if toks}
        if not new:
            return
        R, q, dev = self.rows, max(len(t) for t in new.values()), self.mask.device
        ids = torch.full((R, q), int(self.b.pad_id), dtype=torch.long)
        m = torch.zeros((R, q), dtype=self.mask.dtype)
        pos = self.pos.cpu()[:, None].repeat(1, q)                      # masked columns: any position
        for r, toks in new.items():
            n = len(toks)
            ids[r, q - n:] = torch.tensor(toks)
            m[r, q - n:] = 1
            pos[r, q - n:] = self.pos[r].item() + 1 + torch.arange(n)
        self.mask = torch.cat([self.mask, m.to(dev)], 1)
        with torch.inference_mode(), decoding():
            out = self.b.extend(self.cache, input_ids=ids.to(dev), attention_mask=self.mask,
                                position_ids=pos.to(dev))
            h = out.last_hidden_state[:, -1].float()
            rows = torch.tensor(sorted(new), device=h.device)
            self.hidden[rows] = h[rows]
        for r, toks in new.items():
            self.pos[r] += len(toks)
            self.read[r] += len(toks)


@dataclass
class _Slot:
    """One side-model row of a request: it reads ``prefix`` (None: the request's own prompt) and
    then every token the request has accepted."""
    prefix: list[int] | None
    group: SideRows | None = None  # None until prefilled
    row: int = -1


@dataclass
class _Request:
    side: str                 # the side model's key
    desc_key: str             # the guide's key
    kind: str                 # the guide's kind ("cliper", "drift": `prefsteer.backends.guides`)
    prompt_len: int | None    # tokens of the request's prompt (what a branch's prefix replaces)
    slots: list[_Slot]
    plain: bool = False       # drift: the first slot is the plain branch (else the request is)


class GuidedRequests:
    """The guided requests of one engine, each with its side-model rows and its guide.

    Each description's ``kind`` names how its guide is rebuilt, which rows it keeps and how it mixes
    (`prefsteer.backends.guides`); the built-in kinds:
    * ``cliper``: one row per request, reading the request's own tokens; `CliperGuide` turns its last
      hidden state and the engine's logits into guided logits.
    * ``drift``: one row per attribute branch (and one for the plain branch when it is not the
      request's own context), each reading its branch context and then the request's accepted tokens;
      `DriftGuide.combine` mixes their next-token log-probabilities into the engine's.

    ``load_side(spec) -> TransformersBackend`` loads a side model (``spec`` is a description's
    ``side`` entry); loaded models, guides and groups are kept here. Not shared between threads:
    vLLM calls its logits processor from the model runner's thread only."""

    def __init__(self, load_side: Callable[[dict], Any]):
        self._load_side = load_side
        self.sides: dict[str, Any] = {}
        self.guides: dict[str, Any] = {}
        self.requests: dict[Any, _Request] = {}
        self.groups: dict[str, SideRows] = {}  # side model's key -> all its rows
        self.steps = 0
        self._lock = threading.Lock()

    # -- side models and guides --------------------------------------------------------------
    @staticmethod
    def side_key(spec: dict) -> str:
        return f"{spec.get('model') or ''}|{spec.get('dtype') or ''}"

    def side(self, spec: dict):
        key = self.side_key(spec)
        if key not in self.sides:
            with self._lock:
                if key not in self.sides:
                    self.sides[key] = self._load_side(spec)
        return self.sides[key]

    def guide_key(self, desc: dict) -> str:
        return f"{self.side_key(desc['side'])}#{desc.get('kind', 'cliper')}#{desc['key']}"

    def guide(self, desc: dict):
        key = self.guide_key(desc)
        if key not in self.guides:
            side = self.side(desc["side"])
            if side.fingerprint != desc["fingerprint"]:
                raise ValueError(f"the guide was made for the model {desc['fingerprint']}; the "
                                 f"side model {desc['side'].get('model') or 'default'} is {side.fingerprint}")
            self.guides[key] = kind_of(desc).build(desc, side)
        return self.guides[key]

    # -- requests ----------------------------------------------------------------------------
    def add(self, key: Any, desc: dict, prompt_len: int | None = None) -> None:
        """A request enters (its rows are prefilled at its first `apply`). A Drift request needs
        ``prompt_len``, the length of its prompt, which its branches' contexts stand in for."""
        self.guide(desc)  # loads the side model and checks the fingerprint now
        kind = kind_of(desc)
        plain, prefixes = kind.prefixes(desc, prompt_len)
        self.requests[key] = _Request(self.side_key(desc["side"]), self.guide_key(desc), kind.name, prompt_len,
                                      [_Slot(p) for p in prefixes], plain)

    def retain(self, keys) -> None:
        """Forget every request not in ``keys``, and drop their rows."""
        keys = set(keys)
        for k in [k for k in self.requests if k not in keys]:
            del self.requests[k]
        self._compact()

    def _compact(self) -> None:
        """Drop the rows no request reads any more (its request ended, or its row started over);
        a group goes with its last row."""
        owners: dict[int, list[_Slot]] = {}
        for r in self.requests.values():
            for s in r.slots:
                if s.group is not None:
                    owners.setdefault(id(s.group), []).append(s)
        for side, g in list(self.groups.items()):
            slots = sorted(owners.get(id(g), []), key=lambda s: s.row)
            if not slots:
                del self.groups[side]
            elif len(slots) < g.rows:
                g.keep([s.row for s in slots])
                for i, s in enumerate(slots):
                    s.row = i

    def _sync(self, batch: list[tuple[Any, Sequence[int]]]) -> None:
        """Bring every request's rows to their token sequences: new rows prefilled together and laid
        beside their side model's running rows, the running rows advanced by the tokens they have
        not read."""

        def seq(r: _Request, s: _Slot, tokens: Sequence[int]) -> list[int]:
            return list(tokens) if s.prefix is None else s.prefix + list(tokens[r.prompt_len:])

        rows = [(r, s, seq(r, s, tokens)) for r, tokens in ((self.requests[k], t) for k, t in batch)
                for s in r.slots]
        stale = False  # a row that has read more than its sequence now holds (tokens taken back) starts over
        for _, s, toks in rows:
            if s.group is not None and s.group.read[s.row] > len(toks):
                s.group, stale = None, True
        if stale:
            self._compact()
        fresh: dict[str, list[tuple[_Slot, list[int]]]] = {}
        steps: dict[str, dict[int, Sequence[int]]] = {}
        for r, s, toks in rows:
            if s.group is None:
                fresh.setdefault(r.side, []).append((s, toks))
            else:
                steps.setdefault(r.side, {})[s.row] = toks[s.group.read[s.row]:]
        for side, new in steps.items():
            self.groups[side].advance(new)
        for side, slots in fresh.items():
            g = SideRows(self.sides[side], [toks for _, toks in slots])
            base = self.groups[side].rows if side in self.groups else 0
            if base:
                self.groups[side].join(g)
            else:
                self.groups[side] = g
            for i, (s, _) in enumerate(slots):
                s.group, s.row = self.groups[side], base + i

    def apply(self, logits: torch.Tensor, batch: list[tuple[int, Any, Sequence[int]]]) -> torch.Tensor:
        """Guide the rows ``batch`` names: ``(row of logits, request key, its tokens so far: prompt
        and accepted output)``. Writes the guided rows into ``logits`` (B, V) and returns it."""
        if not batch:
            return logits
        self.steps += 1
        self._sync([(k, seq) for _, k, seq in batch])
        by_guide: dict[tuple[str, bool], list[tuple[int, _Request]]] = {}
        for i, key, _ in batch:
            r = self.requests[key]
            by_guide.setdefault((r.desc_key, r.plain), []).append((i, r))
        for (dk, plain), rows in by_guide.items():
            idx = torch.tensor([i for i, _ in rows], device=logits.device)
            hidden = torch.stack([torch.stack([s.group.hidden[s.row] for s in r.slots]) for _, r in rows])  # (B, S, d)
            r = rows[0][1]
            mixed = guide_kind(r.kind).step(self.guides[dk], self.sides[r.side], hidden, logits[idx], plain)
            logits[idx] = mixed.to(logits.dtype)
        return logits
