"""The feedback worker: a background thread per replica that indexes queued feedback, job by job.

A job names the pairs a feedback request stored (they are in the memory before the request was
answered). Every replica's worker takes jobs from the one queue in the database
(`Memory.claim_job`): a job and its user are leased to one worker, which renews the lease while it
works (`_Heartbeat`); a replica that dies stops renewing, and once its lease runs out another
replica takes the job over. Tenants are served in turn: between two pairs, a worker whose tenant is
not alone in the queue puts its job back, and the queue hands out the job of the tenant served
longest ago, so one tenant's backlog never holds up another's first pair.

The service's method (`Settings.default_method`, EXACT unless told otherwise) takes the pairs one
at a time (`Method.feedback`: EXACT selects attributes and publishes the pair's entry in one
transaction, and a pair already selected costs nothing, so a job taken over resumes where it was).
Every other method the user has a state for is then told of the new pairs, each the way it can
(Drift refits, the rest mark their state stale).

    >>> w = Worker(engine); w.start(); w.notify(); ...; w.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from prefsteer.service.engine import call_quietly
from prefsteer.service.metrics import JOB_SECONDS, PAIRS_INDEXED

log = logging.getLogger("prefsteer.service.worker")


class _Heartbeat:
    """Renews ``owner``'s lease on a job every third of the lease; ``lost`` is set when a renewal
    finds the job no longer ours (taken over, or its user deleted)."""

    def __init__(self, memory, job_id: str, owner: str, lease_seconds: float):
        self.memory, self.job_id, self.owner, self.lease = memory, job_id, owner, lease_seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefsteer-lease", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.lease / 3):
            try:
                if not self.memory.renew_lease(self.job_id, self.owner, self.lease):
                    self.lost.set()
                    return
            except Exception:  # the database is away for a moment: try again at the next beat
                log.warning("could not renew the lease of job %s", self.job_id, exc_info=True)


class Worker:
    def __init__(self, engine, poll_seconds: float = 1.0):
        self.engine = engine
        self.poll_seconds = poll_seconds
        self.lease_seconds = engine.settings.job_lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None
        self._memory = None
        self._method = None

    def start(self) -> None:
        from prefsteer.storage import Memory

        self._memory = Memory(self.engine.settings.db)  # the worker's own connection (or pool)
        self._thread = threading.Thread(target=self._run, name="prefsteer-worker", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the pair being indexed, put the job back in the queue for any replica, and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._memory is not None and not self.alive():
            self._memory.close()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        mem = self._memory
        while not self._stop.is_set():
            try:
                job = mem.claim_job(self.owner, self.lease_seconds)
            except Exception:  # the database is away: wait and try again
                log.warning("could not claim a job", exc_info=True)
                job = None
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            self.current = job["job_id"]
            try:
                with _Heartbeat(mem, job["job_id"], self.owner, self.lease_seconds) as beat:
                    self._process(job, beat)
            except Exception as e:  # a bug or a model error: the job fails, the worker goes on
                log.exception("job %s failed", job["job_id"])
                if mem.release_job(job["job_id"], self.owner, status="failed", finished=time.time(),
                                   error=f"{type(e).__name__}: {e}"):
                    JOB_SECONDS.observe(time.time() - job["started"])
            finally:
                self.current = None

    def _process(self, job: dict, beat: _Heartbeat) -> None:
        mem, user, jid = self._memory, job["user_id"], job["job_id"]
        if self._method is None:
            self._method = self.engine.method(self.engine.settings.default_method, memory=mem)
        method = self._method
        indexed, actions = job["done"], set()
        for pid in job["pair_ids"][indexed:]:
            if beat.lost.is_set():  # another replica has it now
                return
            if self._stop.is_set() or actions and mem.others_waiting(job["tenant"]):
                # a graceful stop, or (after a pair in this turn) another tenant's turn: what is done
                # is saved, the rest resumes later
                mem.release_job(jid, self.owner, status="queued", done=indexed)
                return
            with self.engine.user_lock(user):
                if mem.job(jid) is None:  # the user was deleted meanwhile
                    return
                pair = next((p for p in mem.pairs(user) if p.pair_id == pid), None)
                if pair is None:
                    raise RuntimeError(f"pair {pid} of the job is not in the memory")
                actions.add(method.feedback(user, [pair]))
                indexed += 1
                PAIRS_INDEXED.inc()
                if not mem.update_job(jid, holder=self.owner, done=indexed):
                    return
        result = {method.name: {"indexed": indexed, "result": ", ".join(sorted(actions)) or "resumed", **method.summary(user)}}
        result.update(self._other_methods(user, job["pair_ids"], skip=method.name))
        if mem.release_job(jid, self.owner, status="done", done=indexed, finished=time.time(), result=result):
            JOB_SECONDS.observe(time.time() - job["started"])

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
