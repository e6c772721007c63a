"""The evaluation protocol as data: named configurations (JSON files in ``configs/``) and their
dataclasses.

A configuration names the data, the user sampling and split (EXACT §6: users with 20..100 pairs,
10 per seed, 3 seeds, 8:2 split per user), the methods (registry name + keyword arguments, under a
label so one method can appear with several settings: ``exact-k1``, ``exact-describe``), the
generation win-rate and Table 7's greedy-versus-exhaustive study. A file may ``"extends"`` another
named configuration and override its keys (``methods`` replaces the whole list).

    >>> cfg = load_config("quick")
    >>> [m.label for m in cfg.methods]                               # doctest: +SKIP
    ['none', 'base', 'exact', 'exact-global']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefsteer.errors import InputError
from prefsteer.paths import REPO_ROOT  # where ../shared/ is resolved from

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class MethodSpec:
    label: str = field(metadata={"help": "the name results are reported under"})
    method: str = field(default="", metadata={"help": "registry name (default: the label)"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "keyword arguments of the method's constructor (e.g. exact: k, describe, global_pairs)"})

    def __post_init__(self):
        self.method = self.method or self.label

    @classmethod
    def parse(cls, obj: Any) -> "MethodSpec":
        if isinstance(obj, str):
            return cls(obj)
        if not isinstance(obj, dict) or "label" not in obj and "method" not in obj:
            raise InputError(f"a method entry has to be a name or an object with `label`/`method`, "
                             f"got {obj!r}", field="methods")
        unknown = sorted(set(obj) - {"label", "method", "kwargs"})
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(map(repr, unknown))} in the method entry {obj!r}; "
                             "expected label, method, kwargs", field=f"methods.{unknown[0]}")
        kwargs = obj.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise InputError(f"`kwargs` of method '{obj.get('label') or obj['method']}' has to be an object, "
                             f"got {kwargs!r}", field="methods.kwargs")
        return cls(obj.get("label") or obj["method"], obj.get("method", ""), dict(kwargs))

    def check(self) -> None:
        """The method exists and takes every key of ``kwargs`` (imports the method's module)."""
        check_method_kwargs(self)


def check_method_kwargs(spec: MethodSpec) -> None:
    """An unknown method, or a kwarg the method does not take (an option of its config dataclass or
    its ``extra_options``; the shared resources are the runner's to give), is an `InputError` naming it."""
    from prefsteer.errors import unknown_keys
    from prefsteer.methods import available_methods, get_method_class
    from prefsteer.methods.base import option_names

    if spec.method not in available_methods():
        raise InputError(f"unknown method '{spec.method}' (label '{spec.label}'); available: "
                         f"{', '.join(available_methods())}", field="methods")
    unknown_keys(f"method '{spec.label}' ({spec.method}) in the configuration's kwargs", spec.kwargs,
                 set(option_names(get_method_class(spec.method))))


@dataclass
class WinRateConfig:
    enabled: bool = field(default=False, metadata={"help": "generate and judge against Base"})
    reference: str = field(default="base", metadata={"help": "the label every method is judged against"})
    n_prompts: int = field(default=15, metadata={"help": "test prompts per user"})
    max_new_tokens: int = field(default=300, metadata={"help": "tokens per generation"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "top-k sampling"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    judge_pairs: int = field(default=10, metadata={
        "help": "training pairs shown to the judge at most (0: all; the paper's judge sees all)"})
    judge_chars: int = field(default=6000, metadata={
        "help": "characters of history shown to the judge at most (0: no limit)"})

    def __post_init__(self):
        from prefsteer.evaluation.judge import check_judge_cap

        try:
            check_judge_cap(self.judge_pairs, self.judge_chars, ("judge_pairs", "judge_chars"))
        except ValueError as e:
            bad = "judge_chars" if "`judge_chars`" in str(e) else "judge_pairs"
            raise InputError(str(e), field=f"winrate.{bad}") from None


@dataclass
class Table7Config:
    enabled: bool = field(default=False, metadata={"help": "compare greedy with exhaustive search"})
    n_pairs: int = field(default=5, metadata={"help": "training pairs (of the first seed's users)"})
    library_size: int = field(default=12, metadata={
        "help": "the first N attributes of the library (exhaustive over 42 is too slow here)"})
    k: int = field(default=3, metadata={"help": "attributes per set"})
    ordered: bool = field(default=True, metadata={
        "help": "exhaustive over ordered k-tuples (the rendered order changes F), not only subsets"})


@dataclass
class EvalConfig:
    name: str = field(metadata={"help": "configuration name"})
    data: str = field(metadata={"help": "preference data; relative paths start at the repository root"})
    format: str = field(default="auto", metadata={"help": "data format: auto, jsonl, tldr, prism"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "random seeds"})
    n_users: int = field(default=10, metadata={"help": "users sampled per seed"})
    min_pairs: int = field(default=20, metadata={"help": "users need at least this many pairs"})
    max_pairs: int = field(default=100, metadata={"help": "users have at most this many pairs"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of a user's pairs held out"})
    group_by_prompt: bool = field(default=False, metadata={"help": "keep a prompt's pairs on one side"})
    max_train_pairs: int = field(default=0, metadata={"help": "cap on training pairs per user (0: all)"})
    max_test_pairs: int = field(default=0, metadata={"help": "cap on test pairs per user (0: all)"})
    attributes: list[str] | None = field(default=None, metadata={
        "help": "a subset of the attribute library (names), for speed; null: all"})
    methods: list[MethodSpec] = field(default_factory=list, metadata={"help": "methods to compare"})
    winrate: WinRateConfig = field(default_factory=WinRateConfig)
    table7: Table7Config = field(default_factory=Table7Config)
    notes: str = field(default="", metadata={"help": "free text, copied into reports"})

    def __post_init__(self):
        if not self.seeds:
            raise InputError("`seeds` has to name at least one seed", field="seeds")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise InputError(f"method labels have to be unique, got {labels}", field="methods")

    def method(self, label: str) -> MethodSpec:
        for m in self.methods:
            if m.label == label:
                return m
        raise KeyError(label)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def protocol_id(self) -> str:
        """What makes results comparable: everything but the list of seeds and methods."""
        d = self.to_json()
        for k in ("seeds", "methods", "name", "notes", "winrate", "table7"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def data_path(self) -> Path:
        return resolve_data(self.data)


def resolve_data(data: str) -> Path:
    """An absolute path as is; a relative one from the current directory, else from the repository
    root (``../shared/...`` works from any directory of a source checkout)."""
    p = Path(data)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    raise InputError(f"evaluation data not found (looked at {', '.join(str(c) for c in candidates)}); "
                     f"the shared data folder sits beside the repository as ../shared/data/",
                     file=str(data), field="data")


def _build(cls, obj: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}",
                         file=where, field=unknown[0])
    return cls(**obj)


def config_from_dict(obj: dict, where: str = "<config>") -> EvalConfig:
    obj = dict(obj)
    obj.pop("extends", None)
    obj["methods"] = [MethodSpec.parse(m) for m in obj.get("methods", [])]
    try:
        obj["winrate"] = _build(WinRateConfig, obj.get("winrate", {}), where)
    except InputError as e:
        raise InputError(e.reason, file=e.file or where, line=e.line, field=e.field) from None
    obj["table7"] = _build(Table7Config, obj.get("table7", {}), where)
    try:
        return _build(EvalConfig, obj, where)
    except TypeError as e:
        raise InputError(str(e), file=where) from None


def _read(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    p = Path(name_or_path)
    path = p if p.suffix == ".json" or p.exists() else CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        named = ", ".join(available_configs())
        raise InputError(f"no configuration '{name_or_path}' (named ones: {named}; or a path to a JSON file)",
                         file=str(path), field="config")
    if str(path) in seen:
        raise InputError("configurations extend each other in a cycle", file=str(path), field="extends")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
    if not isinstance(obj, dict):
        raise InputError("a configuration has to be a JSON object", file=str(path))
    name = obj.get("name", path.stem)
    if "extends" in obj:
        parent = _read(obj["extends"], seen + (str(path),))
        for k in ("winrate", "table7"):  # nested sections merge key by key
            if k in obj:
                obj[k] = {**parent.get(k, {}), **obj[k]}
        obj = {**parent, **obj}
    obj["name"] = name
    return obj


def load_config(name_or_path: str) -> EvalConfig:
    """A named configuration (``quick``, ``paper``, ...) or a JSON file."""
    obj = _read(name_or_path)
    obj.pop("extends", None)
    return config_from_dict(obj, where=str(name_or_path))


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
