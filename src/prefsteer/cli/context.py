"""What the commands share: the backend, the memory, the embedder, the attribute library and the
registry's methods, each built on first use from the command line's options.

    ctx = Context(make_parser().parse_args(["generate", "--method", "drift", "hi"]))
    ctx.method("drift").generate("alice", [[{"role": "user", "content": "hi"}]])
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from prefsteer.cli.options import CLI_DEFAULTS, method_options

log = logging.getLogger("prefsteer")

# When the whole prompt + attribute line + response does not fit, nothing is indexed. The attribute
# line's length is bounded by the longest k attribute renderings; this margin covers the template.
_TEMPLATE_MARGIN = 16


class Context:
    """What commands share, each piece built on first use (loading a model takes seconds)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._backend = self._memory = self._embedder = None

    @property
    def backend(self):
        if self._backend is None:
            from prefsteer.backends import load_backend

            start = time.perf_counter()
            self._backend = load_backend(self.args.backend, **self.backend_kwargs())
            log.info("loaded backend %s in %.1fs", self.args.backend, time.perf_counter() - start)
        return self._backend

    def close(self) -> None:
        """Stop the backend's engine (vLLM's process, a streaming scheduler) if one was loaded."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def backend_kwargs(self) -> dict[str, Any]:
        """The options the command line gives the backend (also what Ray workers build theirs from)."""
        if self.args.backend == "hf":
            return {"model": self.args.model, "threads": self.args.threads, "dtype": self.args.dtype,
                    "matmul_precision": self.args.matmul_precision}
        if self.args.backend == "vllm":  # serve's --max-batch-rows is vLLM's batch size (max_num_seqs) too
            rows = getattr(self.args, "max_batch_rows", None)
            return {"model": self.args.model, "dtype": self.args.dtype, **({"max_batch_rows": rows} if rows else {})}
        return {}

    @property
    def writes(self) -> bool:
        """Whether the command writes to the memory (others never create it: a query of a mistyped
        --db says so and leaves no file behind)."""
        return bool(getattr(self.args, "writes", False))

    @property
    def memory(self):
        if self._memory is None:
            from prefsteer.storage import Memory

            self._memory = Memory(self.args.db, create=self.writes)
        return self._memory

    def memory_if_any(self):
        """The memory, or None when a command that writes nothing finds none (plain generation)."""
        from prefsteer.errors import MemoryNotFoundError

        try:
            return self.memory
        except MemoryNotFoundError:
            return None

    @property
    def embedder(self):
        if self._embedder is None:
            from prefsteer.retrieval import load_embedder

            self._embedder = load_embedder(self.args.embedder)
        return self._embedder

    def library(self):
        from prefsteer.attributes import load_library

        return load_library(self.args.attributes)

    def resources(self, **override):
        from prefsteer.methods.registry import Resources

        return Resources(**{"memory": self.memory_if_any(), "library": self.library(), "progress": not self.args.quiet,
                            "embedder": self.args.embedder, **override})

    def method(self, name: str, **override):
        """The registered method ``name`` from the registry, with the options the command line
        gave it (``--<method>-<field>``, or its own spelling: EXACT's --k, CLIPer's --prefs) and
        the command's shared resources (``override`` replaces some: the demo's library). An option
        of another method is refused by name."""
        from prefsteer.methods.registry import build

        return build(name, self.backend, self.resources(**override), method_options(self.args, name),
                     defaults=CLI_DEFAULTS)


def check_lengths(ctx: Context, pairs, method) -> None:
    """Refuse, before anything is written, a pair that cannot fit the model's context: the longest
    context ``method`` builds for the pair's prompt (EXACT's: with the k attributes whose rendering
    is longest) and the longer answer."""
    from prefsteer.errors import InputError

    limit = ctx.backend.max_context
    for p in pairs:
        for msgs in method.length_contexts(p):
            n = ctx.backend.count_tokens(msgs, max(p.chosen, p.rejected, key=len)) + _TEMPLATE_MARGIN
            if n > limit:
                file, line = p.source or (None, None)
                raise InputError(f"prompt, attributes and response take {n} tokens, more than the model's "
                                 f"context of {limit} (pair {p.pair_id!r})", file=file, line=line, field="prompt")
