"""The one door to a method: `build(name, backend, resources, options)`.

The CLI, the evaluator, the service, its feedback worker and the Ray executor all get their methods
here, so a method is built the same way everywhere. What differs between methods is declared on the
method class, not decided by the caller:

* ``resources``: which of the shared `Resources` its constructor takes (the memory, the prompt
  embedder, the attribute library, a score cache, progress bars, extra classifier folders);
* ``config_class``: its options, a dataclass whose fields carry their help text, checked here (an
  option the method does not have is an `UnknownOptionError` naming it);
* ``per_user``: whether it keeps anything per user (`none` does not).

    >>> res = Resources(memory=Memory("memory.db"), embedder="hash")
    >>> m = build("drift", backend, res, {"beta": 2.0})
    >>> m.generate("alice", [[{"role": "user", "content": "Hi"}]])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from prefsteer.methods.base import Method, check_options, config_from_options, get_method_class

if TYPE_CHECKING:
    from prefsteer.attributes import AttributeLibrary
    from prefsteer.storage import Memory
    from prefsteer.retrieval import Embedder


@dataclass
class Resources:
    """What methods share in one process; a method takes the ones it names in ``resources``."""
    memory: "Memory | None" = None
    embedder: "Embedder | str | None" = None    # a loaded embedder, or a name loaded on first use
    library: "AttributeLibrary | str | None" = None  # None: EXACT's 42 attributes
    scorer: Any = None                          # a score cache over the backend, shared by methods
    progress: bool = False                      # progress bars while fitting
    classifier_dirs: list[str] = field(default_factory=list)  # CLIPer: more folders of classifiers


def method_config(name: str, options: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None):
    """The method's config dataclass from ``options`` over ``defaults`` (None when it has none);
    an unknown option or a bad value is a `PrefsteerError` naming it."""
    cls = get_method_class(name)
    cfg_cls = cls.config_class
    options = {k: v for k, v in (options or {}).items() if k not in cls.extra_options}
    if cfg_cls is None:
        check_options(cls, options)
        return None
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    given = {k: v for k, v in (defaults or {}).items() if k in known}
    given.update(options)
    return config_from_options(cfg_cls, given, name)


def build(name: str, backend, resources: Resources | None = None, options: Mapping[str, Any] | Any = None,
          *, defaults: Mapping[str, Any] | None = None) -> Method:
    """The registered method ``name`` on ``backend`` with the shared ``resources`` it takes and its
    validated ``options``: the fields of its config (``defaults`` fill the fields not given, where
    the method has them: the command line's EXACT preset, say), or a config object itself."""
    cls = get_method_class(name)
    resources = resources or Resources()
    kw: dict[str, Any] = {r: getattr(resources, r) for r in cls.resources
                          if getattr(resources, r) not in (None, [])}
    if cls.config_class is not None and isinstance(options, cls.config_class):
        return cls(backend, config=options, **kw)
    config = method_config(name, options, defaults)
    if config is not None:
        kw["config"] = config
    # options that are not config fields (Reward's ``system``), declared in ``extra_options``
    kw.update({k: v for k, v in (options or {}).items() if k in cls.extra_options})
    return cls(backend, **kw)
