"""The side model of guided decoding on vLLM, free of vLLM: rows that follow vLLM's requests.

vLLM's logits processors see logits and token ids, never hidden states; CLIPer's heads need the
last hidden state the next token is predicted from. `GuidedRequests` keeps, for every guided
request, a row of the side model (the hf backend, `prefsteer.backends.hf`) that has read the same
tokens as the request, and turns vLLM's logits into guided ones with the guide the request's
description rebuilds (`CliperGuide.from_description`), i.e. the same top-k, heads and
`guided_logits` as CLIPer on the hf backend.

Rows that arrive in the same engine step are prefilled together, left-padded, as one `SideRows`
group on one key/value cache. At each step every row of a group may read any number of new tokens,
none included (a request still being prefilled in chunks, or not scheduled): the group reads a
block of ``q`` columns, each row's tokens right-aligned in it and the rest masked out, so one
forward serves the group whatever its rows' progress. A row whose request ended is dropped from
the bookkeeping; its group (and cache) goes when its last row does.

Nothing here knows vLLM: `prefsteer.backends.vllm.processor` feeds it from vLLM's batch updates,
and the tests drive it with the hf backend's own logits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

GUIDE_KEY = "prefsteer_guide"  # where a request's guide description travels in SamplingParams.extra_args


class SideRows:
    """Rows of the side model ``b`` (a `TransformersBackend`) on one key/value cache, each
    advanced by its own number of tokens per step."""

    def __init__(self, b, prompts: Sequence[Sequence[int]]):
        from transformers import DynamicCache

        from prefsteer.backends.hf.planner import left_pad

        self.b = b
        dev = b.device
        ids, mask = left_pad([list(p) for p in prompts], b.pad_id)
        self.mask = mask.to(dev)                                         # (R, K): real keys
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.pos = positions[:, -1].clone()                              # (R,): last token's position
        self.read = [len(p) for p in prompts]                            # tokens each row has read
        self.cache = DynamicCache(config=b.config)
        with torch.inference_mode():
            out = b.extend(self.cache, input_ids=ids.to(dev), attention_mask=self.mask, position_ids=positions)
        self.hidden = out.last_hidden_state[:, -1].float()               # (R, d)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def advance(self, new: dict[int, Sequence[int]]) -> None:
        """Row r reads ``new[r]`` (rows not in ``new``, or with no tokens, read nothing)."""
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
        with torch.inference_mode():
            out = self.b.extend(self.cache, input_ids=ids.to(dev), attention_mask=self.mask,
                                position_ids=pos.to(dev))
            h = out.last_hidden_state[:, -1].float()
            rows = torch.tensor(sorted(new), device=h.device)
            self.hidden[rows] = h[rows]
        for r, toks in new.items():
            self.pos[r] += len(toks)
            self.read[r] += len(toks)


@dataclass
class _Row:
    side: str                 # the side model's key
    group: SideRows | None    # None until prefilled
    row: int = -1
    desc_key: str = ""


class GuidedRequests:
    """The guided requests of one engine, each with its side-model row and its guide.

    ``load_side(spec) -> TransformersBackend`` loads a side model (``spec`` is a description's
    ``side`` entry); loaded models, guides and groups are kept here. Not shared between threads:
    vLLM calls its logits processor from the model runner's thread only."""

    def __init__(self, load_side: Callable[[dict], Any]):
        self._load_side = load_side
        self.sides: dict[str, Any] = {}
        self.guides: dict[str, Any] = {}
        self.requests: dict[Any, _Row] = {}
        self.groups: list[SideRows] = []
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
        return f"{self.side_key(desc['side'])}#{desc['key']}"

    def guide(self, desc: dict):
        from prefsteer.methods.cliper.guidance import CliperGuide

        key = self.guide_key(desc)
        if key not in self.guides:
            side = self.side(desc["side"])
            if side.fingerprint != desc["fingerprint"]:
                raise ValueError(f"the guide's heads were trained for the model {desc['fingerprint']}; the "
                                 f"side model {desc['side'].get('model') or 'default'} is {side.fingerprint}")
            self.guides[key] = CliperGuide.from_description(desc, side.token_embeddings())
        return self.guides[key]

    # -- requests ----------------------------------------------------------------------------
    def add(self, key: Any, desc: dict) -> None:
        """A request enters (its row is prefilled at its first `apply`)."""
        self.guide(desc)  # loads the side model and checks the fingerprint now
        self.requests[key] = _Row(self.side_key(desc["side"]), None, desc_key=self.guide_key(desc))

    def retain(self, keys) -> None:
        """Forget every request not in ``keys``; a group goes with its last request."""
        keys = set(keys)
        for k in [k for k in self.requests if k not in keys]:
            del self.requests[k]
        live = {id(r.group) for r in self.requests.values() if r.group is not None}
        self.groups = [g for g in self.groups if id(g) in live]

    def _sync(self, batch: list[tuple[Any, Sequence[int]]]) -> None:
        """Bring every request's row to its token sequence: new rows prefilled as one group per
        side model, the others advanced by the tokens they have not read."""
        fresh: dict[str, list[tuple[_Row, Sequence[int]]]] = {}
        steps: dict[int, tuple[SideRows, dict[int, Sequence[int]]]] = {}
        for key, seq in batch:
            r = self.requests[key]
            if r.group is not None and r.group.read[r.row] > len(seq):  # tokens taken back: start over
                r.group = None
            if r.group is None:
                fresh.setdefault(r.side, []).append((r, seq))
            else:
                steps.setdefault(id(r.group), (r.group, {}))[1][r.row] = seq[r.group.read[r.row]:]
        for g, new in steps.values():
            g.advance(new)
        for side, rows in fresh.items():
            g = SideRows(self.sides[side], [list(seq) for _, seq in rows])
            self.groups.append(g)
            for i, (r, _) in enumerate(rows):
                r.group, r.row = g, i

    def apply(self, logits: torch.Tensor, batch: list[tuple[int, Any, Sequence[int]]]) -> torch.Tensor:
        """Guide the rows ``batch`` names: ``(row of logits, request key, its tokens so far)``.
        Writes the guided rows into ``logits`` (B, V) and returns it."""
        if not batch:
            return logits
        self.steps += 1
        self._sync([(k, seq) for _, k, seq in batch])
        by_guide: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for i, key, _ in batch:
            r = self.requests[key]
            by_guide.setdefault(r.desc_key, []).append((i, r.group.hidden[r.row]))
        for dk, rows in by_guide.items():
            idx = torch.tensor([i for i, _ in rows], device=logits.device)
            hidden = torch.stack([h for _, h in rows]).to(logits.device)
            logits[idx] = self.guides[dk](hidden, logits[idx].float(), None).to(logits.dtype)
        return logits
