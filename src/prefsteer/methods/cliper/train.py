"""Training data and training for CLIPer's classifier heads.

Data is real and produced by the project. For a preference c, the base model answers each prompt
twice: plainly (label 0) and with c's instruction appended to the user's turn (label 1). Both
answers are then read back under the *plain* context, so the head learns what the answer looks
like, not that an instruction was in the prompt (at guidance time there is none). Every position i
of an answer gives one example (h_{i-1}, e(y_i), label): the state that predicted token i and that
token's input embedding, exactly what the guide sees for a candidate. When an answer ended on its
own, the end-of-sequence token is one more example, so a head can learn when stopping is in style.
For a user, the personal head is trained the same way on their pairs (chosen 1, rejected 0).

    >>> data = generate_preference_data(backend, prompts, ["concise"], max_new_tokens=60)
    >>> head, metrics = train_preference(backend, data, "concise")
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from prefsteer.backends.base import GenerationConfig, ScoreRequest, user_turn
from prefsteer.methods.cliper.heads import PreferenceHead
from prefsteer.methods.cliper.prefs import PREFERENCES

log = logging.getLogger(__name__)


@dataclass
class LabelledText:
    """One answer with its label; ``context`` is the plain chat context it is read under."""
    prompt: str
    text: str
    label: int
    group: int                       # prompts (or pairs) share a group: splits never cut one
    token_ids: list[int] | None = None  # as generated, when known
    ended: bool = False              # the answer stopped on end-of-sequence (not max_new_tokens)
    source: str = ""


@dataclass
class TrainConfig:
    rank: int = field(default=16, metadata={"help": "rank of the bilinear hidden x embedding term"})
    steps: int = field(default=300, metadata={"help": "full-batch Adam steps"})
    lr: float = field(default=0.02, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "L2 penalty on the weights"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share of prompts (groups)"})
    seed: int = field(default=0, metadata={"help": "split and initialisation seed"})


# -- features -----------------------------------------------------------------------------------

def continuation_ids(backend, req: ScoreRequest) -> list[int]:
    """The token ids of ``req.continuation`` as the backend reads it after the context."""
    return list(backend.encode_continuation(req.continuation))


def features(backend, items: Sequence[LabelledText], *, batch_size: int = 16,
             with_eos: bool = True) -> dict[str, torch.Tensor]:
    """(h_{i-1}, e(y_i), label) for every position of every item, read under the plain context.

    An item that ``ended`` gets one more position: the state after its last token with the
    end-of-sequence token as the candidate (read by appending the EOS token's text, when the
    backend's tokenizer has one). Returns H (N, d), E (N, d), y (N,), item (N,) (index into
    ``items``)."""
    emb = backend.token_embeddings()                                     # (V, d)
    eos, eos_str = backend.eos_token_ids, backend.eos_text
    end_ok = with_eos and bool(eos) and eos_str is not None
    Hs, Es, ys, idx = [], [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        reqs = [ScoreRequest.of(user_turn(it.prompt), it.text + (eos_str if end_ok and it.ended else ""))
                for it in chunk]
        states = backend.hidden_states(reqs)                             # [(T_i, d)]
        for j, (it, req, h) in enumerate(zip(chunk, reqs, states)):
            ids = continuation_ids(backend, req)
            if len(ids) != h.shape[0]:
                raise RuntimeError(f"backend gave {h.shape[0]} hidden states for {len(ids)} tokens")
            if end_ok and it.ended and (not ids or ids[-1] not in eos):  # EOS did not read back as itself
                n = len(continuation_ids(backend, ScoreRequest.of(user_turn(it.prompt), it.text)))
                ids, h = ids[:n], h[:n]
            if not ids:
                continue
            Hs.append(h.float())
            Es.append(emb[torch.tensor(ids)].float())
            ys.append(torch.full((len(ids),), float(it.label)))
            idx.append(torch.full((len(ids),), start + j, dtype=torch.long))
    if not Hs:
        raise ValueError("no tokens to train on: every text is empty")
    return {"H": torch.cat(Hs), "E": torch.cat(Es), "y": torch.cat(ys), "item": torch.cat(idx)}


# -- training -----------------------------------------------------------------------------------

def _sample_weights(y: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """Each answer weighs the same whatever its length, and both classes weigh the same."""
    counts = torch.bincount(item).float()
    w = 1.0 / counts[item]                                               # (N,)
    for c in (0.0, 1.0):
        m = y == c
        if m.any():
            w[m] = w[m] / w[m].sum()
    return w / w.sum()


def split_groups(groups: Sequence[int], val_fraction: float, seed: int) -> tuple[set[int], set[int]]:
    uniq = sorted(set(groups))
    rng = random.Random(f"cliper:{seed}")
    rng.shuffle(uniq)
    n_val = max(1, round(len(uniq) * val_fraction)) if len(uniq) > 1 and val_fraction > 0 else 0
    return set(uniq[n_val:]), set(uniq[:n_val])


def fit_head(feats: dict[str, torch.Tensor], rows: torch.Tensor, cfg: TrainConfig,
             hidden_size: int) -> PreferenceHead:
    """Weighted logistic regression of y on (H, E) restricted to ``rows`` (bool mask (N,))."""
    H, E, y, item = (feats[k][rows] for k in ("H", "E", "y", "item"))
    # the head's initialisation is seeded without leaving the process's generator changed; torch's
    # thread count is left alone: it is process-wide, and a server trains while it serves
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _fit(H, E, y, item, cfg, hidden_size)


def _fit(H, E, y, item, cfg: TrainConfig, hidden_size: int) -> PreferenceHead:
    head = PreferenceHead(hidden_size, cfg.rank)
    head.set_standardisation(H, E)
    w = _sample_weights(y, item)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    decayed = [head.u, head.v, head.A, head.B]
    for _ in range(cfg.steps):
        opt.zero_grad()
        z = head(H, E)
        loss = (w * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
        loss = loss + cfg.weight_decay * sum((p ** 2).mean() for p in decayed)
        loss.backward()
        opt.step()
    head.eval()
    return head


@torch.no_grad()
def evaluate_head(head: PreferenceHead, feats: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, float]:
    """Token accuracy, and answer accuracy: the sign of the answer's mean log-odds."""
    H, E, y, item = (feats[k][rows] for k in ("H", "E", "y", "item"))
    if y.numel() == 0:
        return {}
    z = head(H, E)
    tok_acc = ((z > 0).float() == y).float().mean().item()
    uniq, inv = torch.unique(item, return_inverse=True)
    mean_z = torch.zeros(len(uniq)).index_add_(0, inv, z) / torch.bincount(inv).float()
    lab = torch.zeros(len(uniq)).scatter(0, inv, y)                    # one label per answer
    seq_acc = ((mean_z > 0).float() == lab).float().mean().item()
    return {"token_accuracy": round(tok_acc, 4), "answer_accuracy": round(seq_acc, 4),
            "answers": int(len(uniq)), "tokens": int(y.numel())}


def train_classifier(backend, items: Sequence[LabelledText], name: str, cfg: TrainConfig | None = None,
                     *, data_description: dict[str, Any] | None = None,
                     feats: dict[str, torch.Tensor] | None = None) -> tuple[PreferenceHead, dict[str, Any]]:
    """Train a head on ``items``; accuracy is measured on held-out groups, then the head is
    refitted on everything. Returns the head (with its sidecar ``meta``) and the metrics."""
    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    feats = feats if feats is not None else features(backend, items)
    d = feats["H"].shape[1]
    groups = [it.group for it in items]
    train_g, val_g = split_groups(groups, cfg.val_fraction, cfg.seed)
    item_group = torch.tensor(groups)[feats["item"]]                    # (N,)
    val_rows = torch.tensor([g in val_g for g in item_group.tolist()])
    metrics: dict[str, Any] = {}
    if val_rows.any() and (~val_rows).any():
        head = fit_head(feats, ~val_rows, cfg, d)
        metrics["validation"] = evaluate_head(head, feats, val_rows)
        metrics["train"] = evaluate_head(head, feats, ~val_rows)
    all_rows = torch.ones(len(feats["y"]), dtype=torch.bool)
    head = fit_head(feats, all_rows, cfg, d)
    metrics["final_train"] = evaluate_head(head, feats, all_rows)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    head.meta = {
        "name": name,
        "fingerprint": backend.fingerprint,
        **({"weights_id": backend.weights_id} if getattr(backend, "weights_id", None) else {}),
        "template_id": backend.template_id,
        "hidden_size": d,
        "rank": cfg.rank,
        "train_config": cfg.__dict__,
        "data": dict(data_description or {}, answers=len(items),
                     positives=sum(it.label == 1 for it in items),
                     negatives=sum(it.label == 0 for it in items),
                     tokens=int(feats["y"].numel())),
        "metrics": metrics,
    }
    return head, metrics


# -- data ---------------------------------------------------------------------------------------

def instructed(prompt: str, instruction: str) -> str:
    return f"{prompt}\n{instruction}"


def generate_preference_data(backend, prompts: Sequence[str], prefs: Sequence[str], *,
                             max_new_tokens: int = 60, batch_size: int = 8, do_sample: bool = False,
                             seed: int = 0, progress: bool = False) -> dict[str, list[LabelledText]]:
    """Plain answers (shared negatives) and instructed answers (positives) for each preference.

    Returns ``{"plain": [...], pref: [...]}``; labels: plain 0, instructed 1."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed,
                           temperature=0.8 if do_sample else 1.0)
    eos = backend.eos_token_ids
    out: dict[str, list[LabelledText]] = {}
    jobs = [("plain", None)] + [(p, PREFERENCES[p].instruction) for p in prefs]
    for key, instr in jobs:
        texts: list[LabelledText] = []
        t0 = time.perf_counter()
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            ctx = [user_turn(p if instr is None else instructed(p, instr)) for p in chunk]
            gens = backend.generate(ctx, cfg)
            for j, (p, g) in enumerate(zip(chunk, gens)):
                ended = len(g.token_ids) < max_new_tokens or any(t in eos for t in g.token_ids)
                texts.append(LabelledText(p, g.text, 0 if instr is None else 1, s + j,
                                          list(g.token_ids), ended, key))
            if progress:
                log.info("%s: %d/%d answers (%.0fs)", key, len(texts), len(prompts),
                         time.perf_counter() - t0)
        out[key] = texts
    return out


def preference_items(data: dict[str, list[LabelledText]], pref: str) -> list[LabelledText]:
    """The labelled answers of one preference: its instructed answers and the plain ones."""
    return list(data["plain"]) + list(data[pref])


def pair_items(pairs) -> list[LabelledText]:
    """A user's pairs as labelled answers: chosen 1, rejected 0, one group per pair."""
    items = []
    for i, p in enumerate(pairs):
        items.append(LabelledText(p.prompt, p.chosen, 1, i, ended=True, source=p.pair_id))
        items.append(LabelledText(p.prompt, p.rejected, 0, i, ended=True, source=p.pair_id))
    return items


# -- the whole job: generate (or reuse), read back once, train every head -------------------------

def save_data(data: dict[str, list[LabelledText]], path, meta: dict[str, Any]) -> None:
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for key, items in data.items():
            for it in items:
                f.write(json.dumps({"set": key, **it.__dict__}) + "\n")
    tmp.replace(path)


def load_data(path) -> tuple[dict[str, Any], dict[str, list[LabelledText]]]:
    import json
    from pathlib import Path

    lines = Path(path).read_text("utf-8").splitlines()
    meta = json.loads(lines[0])["meta"]
    data: dict[str, list[LabelledText]] = {}
    for line in lines[1:]:
        row = json.loads(line)
        key = row.pop("set")
        data.setdefault(key, []).append(LabelledText(**row))
    return meta, data


def subset_features(feats: dict[str, torch.Tensor], items: Sequence[int]) -> dict[str, torch.Tensor]:
    """The rows of the given items, with ``item`` renumbered 0..len(items)-1 in that order."""
    remap = torch.full((int(feats["item"].max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(list(items))] = torch.arange(len(items))
    new = remap[feats["item"]]
    rows = new >= 0
    out = {k: v[rows] for k, v in feats.items()}
    out["item"] = new[rows]
    return out


def cached_preference_data(backend, prompts: Sequence[str], prefs: Sequence[str], *, data_file=None,
                           max_new_tokens: int = 60, batch_size: int = 8,
                           progress: bool = False) -> dict[str, list[LabelledText]]:
    """`generate_preference_data`, kept in ``data_file``: a file made by the same model for the
    same prompts and length, holding every preference asked for, is read instead of generating."""
    from pathlib import Path

    want = {"fingerprint": backend.fingerprint, "prompts": list(prompts), "max_new_tokens": max_new_tokens}
    if data_file and Path(data_file).is_file():
        meta, cached = load_data(data_file)
        if all(meta.get(k) == v for k, v in want.items()) and all(p in cached for p in ["plain", *prefs]):
            log.info("reusing the answers in %s", data_file)
            return cached
    data = generate_preference_data(backend, prompts, prefs, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=progress)
    if data_file:
        save_data(data, data_file, want)
    return data


def read_back(backend, data: dict[str, list[LabelledText]], keys: Sequence[str]
              ) -> tuple[list[LabelledText], dict[str, torch.Tensor], dict[str, range]]:
    """Every answer of ``keys`` read back once, the answers of one prompt together (they share its
    prefix). Returns the answers in ``keys`` order, their features (``item`` indexes that list) and
    each key's range in it."""
    flat = [it for k in keys for it in data[k]]
    order = sorted(range(len(flat)), key=lambda i: (flat[i].group, i))
    t0 = time.perf_counter()
    feats_sorted = features(backend, [flat[i] for i in order], batch_size=6 * len(keys))
    log.info("features of %d answers: %.0fs", len(flat), time.perf_counter() - t0)
    feats = dict(feats_sorted, item=torch.tensor(order)[feats_sorted["item"]])
    offsets, pos = {}, 0
    for k in keys:
        offsets[k] = range(pos, pos + len(data[k]))
        pos += len(data[k])
    return flat, feats, offsets


def train_preferences(backend, prompts: Sequence[str], prefs: Sequence[str], *, out_dir,
                      data_file=None, max_new_tokens: int = 60, batch_size: int = 8,
                      cfg: TrainConfig | None = None, source: str = "",
                      progress: bool = False) -> dict[str, dict[str, Any]]:
    """Generate (or reuse ``data_file``) the answers, train and save one head per preference.

    Returns ``{pref: {"path", "metrics"}}``."""
    from prefsteer.methods.cliper.heads import save_classifier

    data = cached_preference_data(backend, prompts, prefs, data_file=data_file, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=progress)
    flat, feats, offsets = read_back(backend, data, ["plain", *prefs])
    results = {}
    for p in prefs:
        idx = list(offsets["plain"]) + list(offsets[p])
        items = [flat[i] for i in idx]
        desc = {"kind": "instructed-vs-plain", "source": source, "instruction": PREFERENCES[p].instruction,
                "generation": {"max_new_tokens": max_new_tokens, "decoding": "greedy"},
                "prompts": len(prompts)}
        head, metrics = train_classifier(backend, items, p, cfg, data_description=desc,
                                         feats=subset_features(feats, idx))
        path = save_classifier(head, out_dir)
        results[p] = {"path": str(path), "metrics": metrics}
        log.info("%s: %s", p, metrics.get("validation"))
    return results
