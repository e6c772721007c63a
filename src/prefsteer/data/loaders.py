"""Loaders that turn preference files into :class:`~prefsteer.types.PreferencePair` lists.

Three formats are read, each validated completely at the boundary: a bad record raises
:class:`~prefsteer.errors.InputError` naming the file, the 1-based line and the field, and nothing is
returned from a file that failed, so a caller never writes anything derived from it.

- ``jsonl``: one object per line with ``user_id``, ``prompt``, ``chosen``, ``rejected`` and an
  optional ``pair_id``; other fields go to ``meta``. A record without ``prompt`` but with ``title``
  and ``post`` (the TL;DR fixture format) gets ``tldr_prompt(title, post, subreddit)``.
- ``tldr``: the raw comparison files of summarize-from-feedback (``info``, ``summaries``,
  ``choice``, ``worker``); the summaries' ``note`` is dropped because it can leak the label.
- ``prism``: PRISM's ``utterances.jsonl``; in each (conversation, turn) the chosen response is
  paired against every other response of that turn.

    >>> pairs = load_pairs("../shared/data/tldr/batch13.json")       # doctest: +SKIP
    >>> by_user = group_by_user(pairs)                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

from prefsteer.errors import InputError
from prefsteer.types import PreferencePair, pair_key
from prefsteer.data.prompts import tldr_prompt

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "tldr", "prism")
_MISSING = object()


# --------------------------------------------------------------------------- reading and checking

def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


MAX_ERRORS = 20  # bad lines reported in one run


class _Errors:
    """The bad lines of one file, collected so one run reports them all (up to `MAX_ERRORS`)."""

    def __init__(self, file: str):
        self.file, self.errors, self.more = file, [], 0

    def add(self, e: InputError) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(e)
        else:
            self.more += 1

    def check(self) -> None:
        """Raise one `InputError` listing every bad line, when there was one."""
        if not self.errors:
            return
        if len(self.errors) == 1 and not self.more:
            raise self.errors[0]
        n = len(self.errors) + self.more
        lines = [str(e) for e in self.errors] + ([f"... and {self.more} more"] if self.more else [])
        err = InputError(f"{n} bad lines (nothing was read from the file):\n  " + "\n  ".join(lines),
                         file=self.file)
        err.errors = self.errors
        raise err


def _records(path: Path, errors: _Errors) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a JSONL file; bad lines go to
    ``errors``."""
    file = str(path)
    if not path.exists():
        raise InputError("no such file", file=file)
    if path.is_dir():
        raise InputError("is a directory, expected a JSONL file", file=file)
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                errors.add(InputError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=file, line=line_no))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.add(InputError(f"malformed JSON: {e.msg} (column {e.colno})", file=file, line=line_no))
                continue
            if not isinstance(obj, dict):
                errors.add(InputError(f"expected a JSON object, got {_json_type(obj)}", file=file, line=line_no))
                continue
            bad = _unencodable(obj)
            if bad is not None:
                field, char = bad
                errors.add(InputError(f"text holds a lone surrogate escape ({char}), which is not a character: "
                                      "fix the escape or the program that wrote the file", file=file,
                                      line=line_no, field=field))
                continue
            yield line_no, obj


def _unencodable(value: Any, field: str = "") -> tuple[str, str] | None:
    """(dotted field, escape) of the first string (key or value) in ``value`` that UTF-8 cannot
    encode: JSON's ``"\\ud800"`` parses to a lone surrogate, which fails later, far from the file."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return field or "(value)", f"\\u{ord(value[e.start]):04x}"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{field}.{k}" if field else str(k)
            bad = _unencodable(k, name) or _unencodable(v, name)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = _unencodable(v, f"{field}[{i}]")
            if bad is not None:
                return bad
    return None


class _Checker:
    """Typed field access for one record; every failure names file, line and (dotted) field."""

    def __init__(self, file: str, line: int):
        self.file, self.line = file, line

    def fail(self, message: str, field: str | None = None) -> InputError:
        return InputError(message, file=self.file, line=self.line, field=field)

    def _get(self, obj: dict, key: str, name: str, optional: bool) -> Any:
        if key not in obj:
            if optional:
                return _MISSING
            raise self.fail("missing required field", name)
        return obj[key]

    def text(self, obj: dict, key: str, name: str | None = None, *, optional: bool = False,
             nullable: bool = False) -> str | None:
        """A non-empty string (whitespace-only counts as empty); None when optional and absent."""
        name = name or key
        value = self._get(obj, key, name, optional)
        if value is _MISSING or (value is None and nullable):
            return None
        if not isinstance(value, str):
            raise self.fail(f"expected a string, got {_json_type(value)}", name)
        if not value.strip():
            raise self.fail("empty (whitespace-only) text", name)
        return value

    def integer(self, obj: dict, key: str, name: str | None = None, *, optional: bool = False,
                nullable: bool = False) -> int | None:
        name = name or key
        value = self._get(obj, key, name, optional)
        if value is _MISSING or (value is None and nullable):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"expected an integer, got {_json_type(value)}", name)
        return value

    def number(self, obj: dict, key: str, name: str | None = None, *, optional: bool = False,
               nullable: bool = False) -> float | int | None:
        name = name or key
        value = self._get(obj, key, name, optional)
        if value is _MISSING or (value is None and nullable):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"expected a number, got {_json_type(value)}", name)
        return value

    def boolean(self, obj: dict, key: str, name: str | None = None) -> bool:
        name = name or key
        value = self._get(obj, key, name, False)
        if not isinstance(value, bool):
            raise self.fail(f"expected true or false, got {_json_type(value)}", name)
        return value

    def object(self, obj: dict, key: str, name: str | None = None, *,
               optional: bool = False) -> dict | None:
        name = name or key
        value = self._get(obj, key, name, optional)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            raise self.fail(f"expected an object, got {_json_type(value)}", name)
        return value

    def array(self, obj: dict, key: str, name: str | None = None) -> list:
        name = name or key
        value = self._get(obj, key, name, False)
        if not isinstance(value, list):
            raise self.fail(f"expected an array, got {_json_type(value)}", name)
        return value

    def distinct(self, chosen: str, rejected: str, field: str = "rejected") -> None:
        # Texts that differ only in surrounding whitespace carry no preference either.
        if chosen.strip() == rejected.strip():
            raise self.fail("chosen and rejected are the same text", field)


# --------------------------------------------------------------------------- generic JSONL

_JSONL_CORE = ("user_id", "prompt", "chosen", "rejected", "pair_id", "id")


def load_jsonl(path: str | Path) -> list[PreferencePair]:
    """Generic preference JSONL (see the module docstring); blank lines are skipped.

    A pair's id is its ``pair_id`` (or ``id``) field when given, else the content key of (user,
    prompt, chosen, rejected) (`prefsteer.types.pair_key`): an edited line is a new pair, and a line
    repeated word for word is read once. Fields other than the core ones are kept in ``meta`` (for
    the TL;DR fixture format: post_id, subreddit, title, post). Every bad line (up to 20) is
    reported in one `InputError`.
    """
    path = Path(path)
    file = str(path)
    errors = _Errors(file)
    pairs: list[PreferencePair] = []
    seen: dict[str, tuple[int, tuple[str, ...]]] = {}
    for line, obj in _records(path, errors):
        chk = _Checker(file, line)
        try:
            user_id = chk.text(obj, "user_id")
            if "prompt" in obj or not ("title" in obj or "post" in obj):
                prompt = chk.text(obj, "prompt")
            else:  # the TL;DR fixture format: the prompt is built from the post
                title = chk.text(obj, "title")
                post = chk.text(obj, "post")
                subreddit = chk.text(obj, "subreddit", optional=True, nullable=True)
                prompt = tldr_prompt(title, post, subreddit)
            chosen = chk.text(obj, "chosen")
            rejected = chk.text(obj, "rejected")
            chk.distinct(chosen, rejected)
            id_key = "pair_id" if "pair_id" in obj else "id"
            given = chk.text(obj, id_key, optional=True)
            pair_id = given or pair_key(user_id, prompt, chosen, rejected)
            content = (user_id, prompt, chosen, rejected)
            if pair_id in seen:
                first, before = seen[pair_id]
                if before == content:
                    log.info("%s:%d: the same pair as line %d, read once", file, line, first)
                    continue
                raise chk.fail(f"duplicate pair_id '{pair_id}' with other text (first on line {first})", id_key)
            seen[pair_id] = (line, content)
        except InputError as e:
            errors.add(e)
            continue
        meta = {k: v for k, v in obj.items() if k not in _JSONL_CORE}
        pairs.append(PreferencePair(user_id, prompt, chosen, rejected, pair_id, meta, (file, line)))
    errors.check()
    return pairs


# --------------------------------------------------------------------------- TL;DR comparisons

def load_tldr_comparisons(path: str | Path) -> list[PreferencePair]:
    """The raw summarize-from-feedback comparison format (e.g. ``batch13.json``).

    user_id = ``worker``; chosen = ``summaries[choice].text``, rejected = the other summary;
    prompt = ``tldr_prompt(info.title, info.post, info.subreddit)``; pair_id = the content key
    (`prefsteer.types.pair_key`): the data set has no id per comparison, and a file's name and line
    are not one (another folder's ``batch13.json`` is other data); meta: post_id, subreddit, title,
    policies ({"chosen", "rejected"}), confidence (``extra.confidence``), split, batch. ``note`` is
    dropped.
    """
    path = Path(path)
    file = str(path)
    pairs: list[PreferencePair] = []
    errors = _Errors(file)
    for line, obj in _records(path, errors):
        try:
            pairs.append(_tldr_record(obj, _Checker(file, line), line, file))
        except InputError as e:
            errors.add(e)
    errors.check()
    return pairs


def _tldr_record(obj: dict, chk: "_Checker", line: int, file: str) -> PreferencePair:
    """One comparison, identified by its content."""
    info = chk.object(obj, "info")
    post_id = chk.text(info, "id", "info.id")
    title = chk.text(info, "title", "info.title")
    post = chk.text(info, "post", "info.post")
    subreddit = chk.text(info, "subreddit", "info.subreddit", optional=True, nullable=True)
    summaries = chk.array(obj, "summaries")
    if len(summaries) != 2:
        raise chk.fail(f"expected 2 summaries, got {len(summaries)}", "summaries")
    texts, policies = [], []
    for i, s in enumerate(summaries):
        if not isinstance(s, dict):
            raise chk.fail(f"expected an object, got {_json_type(s)}", f"summaries[{i}]")
        texts.append(chk.text(s, "text", f"summaries[{i}].text"))
        policies.append(chk.text(s, "policy", f"summaries[{i}].policy"))
    choice = chk.integer(obj, "choice")
    if not 0 <= choice < len(summaries):
        raise chk.fail(f"choice {choice} is out of range (there are {len(summaries)} summaries)",
                       "choice")
    worker = chk.text(obj, "worker")
    extra = chk.object(obj, "extra", optional=True) or {}
    confidence = chk.integer(extra, "confidence", "extra.confidence", optional=True, nullable=True)
    split = chk.text(obj, "split", optional=True, nullable=True)
    batch = chk.text(obj, "batch", optional=True, nullable=True)
    chosen, rejected = texts[choice], texts[1 - choice]
    chk.distinct(chosen, rejected, "summaries")
    meta = {"post_id": post_id, "subreddit": subreddit, "title": title,
            "policies": {"chosen": policies[choice], "rejected": policies[1 - choice]},
            "confidence": confidence, "split": split, "batch": batch}
    prompt = tldr_prompt(title, post, subreddit)
    return PreferencePair(worker, prompt, chosen, rejected, pair_key(worker, prompt, chosen, rejected), meta,
                          (file, line))


# --------------------------------------------------------------------------- PRISM

def load_prism(path: str | Path, *, history: bool = True) -> list[PreferencePair]:
    """PRISM (Kirk et al., 2024) pairs from ``utterances.jsonl`` (a directory holding it, or the file).

    Rows are validated against the datacard's fields: user_id, conversation_id (strings), turn,
    within_turn_id (integers), user_prompt, model_response (non-empty strings), if_chosen (boolean),
    score (number or null); model_name, utterance_id and conversation_type are kept when present.

    Within one (conversation_id, turn) the chosen response is paired against each other response of
    that turn, in file order. Skipped: turns with no chosen response, responses whose score equals
    the chosen one's (a tie carries no preference) and responses whose text equals the chosen one.

    The prompt of turn 0 is its ``user_prompt``. For a later turn with ``history=True`` the prompt is
    the conversation so far, rebuilt from the chosen rows of the earlier turns of the same file
    (``utterances.jsonl`` holds the same data as ``conversations.jsonl``, so that file is not read):
    ``"User: ...\\n\\nAssistant: ...\\n\\nUser: <user_prompt>"``; ``meta["history"]`` holds the same
    earlier turns as chat messages. With ``history=False`` the prompt is just the ``user_prompt``.
    """
    path = Path(path)
    utt = path / "utterances.jsonl" if path.is_dir() else path
    file = str(utt)
    if path.is_dir() and not utt.exists():
        raise InputError(f"no utterances.jsonl in the PRISM directory {path}", file=file)

    groups: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = {}
    errors = _Errors(file)
    for line, obj in _records(utt, errors):
        try:
            _prism_row(obj, _Checker(file, line), groups)
        except InputError as e:
            errors.add(e)
    errors.check()

    chosen_of = {key: next((r for _, r in g if r["if_chosen"]), None) for key, g in groups.items()}
    pairs: list[PreferencePair] = []
    skipped = {"no_chosen": 0, "tie": 0, "same_text": 0}
    for (conv, turn), group in groups.items():
        best = chosen_of[(conv, turn)]
        if best is None:
            skipped["no_chosen"] += 1
            continue
        messages: list[dict[str, str]] = []
        if history:
            for t in range(turn):
                prev = chosen_of.get((conv, t))
                if prev is not None:
                    messages += [{"role": "user", "content": prev["user_prompt"]},
                                 {"role": "assistant", "content": prev["model_response"]}]
        if messages:
            transcript = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                          for m in messages]
            prompt = "\n\n".join(transcript + [f"User: {best['user_prompt']}"])
        else:
            prompt = best["user_prompt"]
        for _, other in group:
            if other is best:
                continue
            if (best["score"] is not None and other["score"] is not None
                    and best["score"] == other["score"]):
                skipped["tie"] += 1
                continue
            if other["model_response"].strip() == best["model_response"].strip():
                skipped["same_text"] += 1
                continue
            meta = {"conversation_id": conv, "turn": turn,
                    "conversation_type": best["conversation_type"],
                    "chosen_score": best["score"], "rejected_score": other["score"],
                    "chosen_model": best["model_name"], "rejected_model": other["model_name"],
                    "chosen_utterance_id": best["utterance_id"],
                    "rejected_utterance_id": other["utterance_id"],
                    "history": messages, "user_prompt": best["user_prompt"]}
            pairs.append(PreferencePair(
                best["user_id"], prompt, best["model_response"], other["model_response"],
                f"{conv}:{turn}:{best['within_turn_id']}>{other['within_turn_id']}", meta))
    if any(skipped.values()):
        log.info("PRISM %s: %d pairs; skipped %d turns without a chosen response, %d ties, "
                 "%d equal texts", file, len(pairs), skipped["no_chosen"], skipped["tie"],
                 skipped["same_text"])
    return pairs


def _prism_row(obj: dict, chk: "_Checker", groups: dict) -> None:
    """Check one utterance row and add it to its (conversation, turn) group."""
    row = {
        "user_id": chk.text(obj, "user_id"),
        "conversation_id": chk.text(obj, "conversation_id"),
        "turn": chk.integer(obj, "turn"),
        "within_turn_id": chk.integer(obj, "within_turn_id"),
        "user_prompt": chk.text(obj, "user_prompt"),
        "model_response": chk.text(obj, "model_response"),
        "if_chosen": chk.boolean(obj, "if_chosen"),
        "score": chk.number(obj, "score", nullable=True),
        "model_name": chk.text(obj, "model_name", optional=True, nullable=True),
        "utterance_id": chk.text(obj, "utterance_id", optional=True, nullable=True),
        "conversation_type": chk.text(obj, "conversation_type", optional=True, nullable=True),
    }
    if row["turn"] < 0:
        raise chk.fail(f"expected a turn >= 0, got {row['turn']}", "turn")
    group = groups.setdefault((row["conversation_id"], row["turn"]), [])
    if group:  # one user, one prompt, one chosen response and distinct ids per turn
        first_line, first = group[0]
        for key in ("user_id", "user_prompt"):
            if row[key] != first[key]:
                raise chk.fail(f"differs from line {first_line} of the same conversation turn", key)
        for other_line, other in group:
            if other["within_turn_id"] == row["within_turn_id"]:
                raise chk.fail(f"duplicate within_turn_id {row['within_turn_id']} in this turn "
                               f"(first on line {other_line})", "within_turn_id")
            if row["if_chosen"] and other["if_chosen"]:
                raise chk.fail(f"a second chosen response in this turn (first on line "
                               f"{other_line})", "if_chosen")
    group.append((chk.line, row))


# --------------------------------------------------------------------------- dispatch and grouping

def detect_format(path: str | Path) -> str:
    """"prism" for a directory, "tldr" when the first record has ``summaries`` and ``worker``,
    "prism" when it has ``if_chosen`` and ``within_turn_id``, else "jsonl"."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", file=str(path))
    if path.is_dir():
        return "prism"
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    first = json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return "jsonl"  # the jsonl loader reports the error with its line
                if isinstance(first, dict):
                    if "summaries" in first and "worker" in first:
                        return "tldr"
                    if "if_chosen" in first and "within_turn_id" in first:
                        return "prism"
                break
    return "jsonl"


def load_pairs(path: str | Path, format: str = "auto") -> list[PreferencePair]:
    """Load pairs in the named format ("jsonl", "tldr", "prism") or detect it ("auto")."""
    if format == "auto":
        format = detect_format(path)
    loaders = {"jsonl": load_jsonl, "tldr": load_tldr_comparisons, "prism": load_prism}
    if format not in loaders:
        raise InputError(f"unknown format '{format}'; expected auto, {', '.join(FORMATS)}",
                         field="format")
    return loaders[format](path)


def group_by_user(pairs: Iterable[PreferencePair]) -> dict[str, list[PreferencePair]]:
    """Pairs per user, users in order of first appearance, each user's pairs in file order."""
    by_user: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        by_user.setdefault(p.user_id, []).append(p)
    return by_user
