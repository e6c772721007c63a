"""Where EXACT's attribute selections are computed: in this process (serial) or on Ray workers.

`prefsteer index --executor ray [--address ...] [--workers N]` spreads the pairs still to select over
Ray actors, each holding one backend (built from the same backend name and options as the driver's)
and an EXACT selector with the driver's configuration and attribute library. The workers only
compute: each returns a pair's selection, and the driver writes it into the memory the moment it
arrives (`Memory.put_selection`, as a serial run does after each pair), so an interrupted run
resumes where it stopped, whichever executor ran it. Once a user's selections are all stored the
driver runs the method's own `fit`, which finds every selection stored, computes nothing and
replaces the user's retrievable memory in one transaction: the memory is exactly what a serial run
writes.

    >>> from prefsteer.executors import RayExecutor
    >>> ex = RayExecutor("hf", {"model": None}, address=None, workers=2)   # a local Ray instance
    >>> ex.select_missing(exact_method, pairs_by_user)                     # selections written as they come
    >>> exact_method.fit(user, pairs)                                      # what serial indexing does

A pair that two users judged alike (same prompt and responses) is selected once. The workers keep
their own in-memory score caches, not the driver's SQLite one: the driver's score cache gets no
entries from a Ray run (its selections are what later runs reuse).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from prefsteer.errors import InputError

log = logging.getLogger(__name__)


class _Selector:
    """What a Ray actor holds: one backend and an EXACT selector in the driver's configuration."""

    def __init__(self, backend: str, backend_kwargs: dict, config: Any, library: Any, method: str):
        from prefsteer.backends import load_backend
        from prefsteer.storage import Memory
        from prefsteer.methods.registry import Resources, build

        self.backend = load_backend(backend, **backend_kwargs)
        self.method = build(method, self.backend, Resources(memory=Memory(":memory:"), library=library),
                            config)
        self._start = None
        self.method._greedy_start = lambda pair: self._start  # the driver looked it up in its memory

    def fingerprint(self) -> str:
        return self.backend.fingerprint

    def select(self, pair, start) -> dict:
        self._start = start
        s = self.method.select(pair)
        return {"attributes": list(s.attributes), "objective": s.objective,
                "base_objective": s.base_objective, "gains": list(s.gains)}


class RayExecutor:
    """Ray actors, each with one backend, computing EXACT selections for the driver to store."""

    def __init__(self, backend: str, backend_kwargs: dict | None = None, *, address: str | None = None,
                 workers: int | None = None, num_cpus_per_worker: float = 1.0):
        try:
            import ray
        except ImportError:
            raise InputError("--executor ray needs Ray: pip install 'prefsteer[ray]'", field="executor") from None
        self.ray = ray
        self._owns = not ray.is_initialized()  # started here: shut down here
        if self._owns:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if address:
                kw["address"] = address
            else:  # a local instance: as many CPUs as the workers ask for, at least
                kw["num_cpus"] = max(int(num_cpus_per_worker * (workers or 2)), os.cpu_count() or 1)
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            ray.init(**kw)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus_per_worker))
        if workers < 1:
            raise InputError(f"`workers` (={workers}) has to be at least 1", field="workers")
        self.workers = workers
        self.backend, self.backend_kwargs = backend, dict(backend_kwargs or {})
        self.num_cpus = num_cpus_per_worker
        self._actors: list = []

    def _start_actors(self, method) -> list:
        if not self._actors:
            cls = self.ray.remote(num_cpus=self.num_cpus)(_Selector)
            self._actors = [cls.remote(self.backend, self.backend_kwargs, method.config, method.library,
                                       method.name) for _ in range(self.workers)]
            fps = self.ray.get([a.fingerprint.remote() for a in self._actors])
            if any(fp != method.backend.fingerprint for fp in fps):
                raise InputError(f"the Ray workers' model ({fps[0]}) is not the driver's "
                                 f"({method.backend.fingerprint}): every node needs the same model files",
                                 field="model")
        return self._actors

    def select_missing(self, method, pairs_by_user: dict[str, Sequence], progress: bool = False) -> dict[str, int]:
        """Compute, on the workers, every selection the users' ``fit`` would make, writing each into
        ``method.memory`` as it arrives. ``pairs_by_user`` maps a user to the pairs ``fit`` will run
        on (the caller has stored them). Returns counts: selected, reused, duplicates."""
        mem, cid = method.memory, method.config_id
        todo: dict[tuple, list] = {}  # (prompt, chosen, rejected, start) -> pairs to write
        reused = 0
        for user, pool in pairs_by_user.items():
            for p in pool:
                if mem.selection(user, p.pair_id, cid) is not None:
                    reused += 1
                    continue
                start = method._greedy_start(p) if method.config.mode == "greedy" else None
                key = (p.prompt, p.chosen, p.rejected, None if start is None else repr(start))
                todo.setdefault(key, []).append((p, start))
        if not todo:
            return {"selected": 0, "reused": reused, "duplicates": 0}
        actors = self._start_actors(method)
        jobs = list(todo.values())
        pending: dict = {}
        next_job = 0
        started = time.perf_counter()

        def submit(actor) -> None:
            nonlocal next_job
            if next_job < len(jobs):
                p, start = jobs[next_job][0]
                pending[actor.select.remote(p, start)] = (actor, next_job)
                next_job += 1

        for a in actors:  # one pair per worker at a time, the next one as soon as a worker is free
            submit(a)
        done = 0
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            actor, j = pending.pop(ready[0])
            sel = self.ray.get(ready[0])  # a worker's error is raised here, after what was stored
            for p, _start in jobs[j]:
                mem.put_selection(p.user_id, p.pair_id, cid, **sel)
            done += 1
            if progress:
                log.info("selected %d of %d pairs on %d workers (%.0f s)", done, len(jobs), len(actors),
                         time.perf_counter() - started)
            submit(actor)
        n = sum(len(j) for j in jobs)
        return {"selected": len(jobs), "reused": reused, "duplicates": n - len(jobs)}

    def shutdown(self) -> None:
        for a in self._actors:
            self.ray.kill(a)
        self._actors = []
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
