"""The feedback worker: one background thread that indexes queued feedback, job by job.

A job names the pairs a feedback request stored (they are in the memory before the request was
answered). The service's method (`Settings.default_method`, EXACT unless told otherwise) takes them
one pair at a time (`Method.feedback`: EXACT selects attributes and publishes the pair's entry in
one transaction, so the user's retrievable index only ever gains whole entries, and a pair already
selected costs nothing: a job interrupted by a crash or a stop goes back to the queue and resumes
where it was). Every other method the user has a state for is then told of the new pairs, each the
way it can (Drift refits, the rest mark their state stale).

    >>> w = Worker(engine); w.start(); w.notify(); ...; w.stop()
"""

from __future__ import annotations

import logging
import threading
import time

from prefsteer.service import store
from prefsteer.service.engine import call_quietly

log = logging.getLogger("prefsteer.service.worker")


class Worker:
    def __init__(self, engine, poll_seconds: float = 1.0):
        self.engine = engine
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None
        self._memory = None
        self._method = None

    def start(self) -> None:
        from prefsteer.memory import Memory

        self._memory = Memory(self.engine.settings.db)  # the worker's own connection
        n = store.requeue_running(self._memory)
        if n:
            log.info("resuming %d interrupted job(s)", n)
        self._thread = threading.Thread(target=self._run, name="prefsteer-worker", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the pair being indexed, put the job back in the queue, and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._memory is not None and not self.alive():
            self._memory.close()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            job = store.next_queued(self._memory)
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            self.current = job["job_id"]
            try:
                self._process(job)
            except Exception as e:  # a bug or a model error: the job fails, the worker goes on
                log.exception("job %s failed", job["job_id"])
                store.update_job(self._memory, job["job_id"], status="failed", finished=time.time(),
                                 error=f"{type(e).__name__}: {e}")
            finally:
                self.current = None

    def _process(self, job: dict) -> None:
        mem, user, jid = self._memory, job["user_id"], job["job_id"]
        if not store.update_job(mem, jid, status="running", started=job["started"] or time.time()):
            return
        if self._method is None:
            self._method = self.engine.method(self.engine.settings.default_method, memory=mem)
        method = self._method
        indexed, actions = 0, set()
        for pid in job["pair_ids"]:
            if self._stop.is_set():  # graceful stop: what is done is saved; the rest resumes later
                store.update_job(mem, jid, status="queued", done=indexed)
                return
            with self.engine.user_lock(user):
                if store.get_job(mem, jid) is None:  # the user was deleted meanwhile
                    return
                pair = next((p for p in mem.pairs(user) if p.pair_id == pid), None)
                if pair is None:
                    raise RuntimeError(f"pair {pid} of the job is not in the memory")
                actions.add(method.feedback(user, [pair]))
                indexed += 1
                store.update_job(mem, jid, done=indexed)
        result = {method.name: {"indexed": indexed, "result": ", ".join(sorted(actions)), **method.summary(user)}}
        result.update(self._other_methods(user, job["pair_ids"], skip=method.name))
        store.update_job(mem, jid, status="done", done=indexed, finished=time.time(), result=result)

    def _other_methods(self, user: str, pair_ids: list[str], skip: str) -> dict:
        """Tell the user's other fitted methods of the new pairs (each the way it can)."""
        from prefsteer.methods import available_methods

        out: dict = {}
        mem = self._memory
        names = sorted({s["method"] for s in mem.method_states(user)} & set(available_methods()) - {skip})
        if not names:
            return out
        pairs = [p for p in mem.pairs(user) if p.pair_id in set(pair_ids)]
        for name in names:
            def tell(name=name):
                return self.engine.method(name, memory=mem).feedback(user, pairs)
            done, err = call_quietly(tell)
            out[name] = {"result": done} if err is None else {"error": err}
        return out
