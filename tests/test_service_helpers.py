"""Starting the service for tests: uvicorn in a thread, or `prefsteer serve` in a subprocess, on a
free loopback port; both stopped by the test."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def thread_server(settings, timeout: float = 30.0):
    """The app of ``settings`` served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    from prefsteer.service import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout)


def wait_job(client: httpx.Client, job_id: str, headers=None, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if j.get("status") in ("done", "failed") or time.monotonic() > deadline:
            return j
        time.sleep(0.1)


def start_process(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, **(env or {})})


def wait_http(base: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(base + "/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not answer in {timeout}s: {log.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def serve_script(db: str, port: int, **settings) -> list[str]:
    """A server process that does not depend on the CLI's wiring (the crash test kills it)."""
    code = ("import sys, uvicorn; from prefsteer.service import Settings, create_app; "
            f"s = Settings(db={db!r}, backend='fake', embedder='hash', **{settings!r}); "
            f"uvicorn.run(create_app(s), host='127.0.0.1', port={port}, log_level='warning')")
    return [sys.executable, "-c", code]
