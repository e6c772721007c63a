"""`prefsteer keys` and `prefsteer serve` as a user runs them: subprocesses, a free loopback port,
the fake backend; the server is stopped by the test."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.test_service_helpers import REPO, free_port, start_process, stop_process, wait_http  # noqa: E402

CLI = [sys.executable, "-m", "prefsteer.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_keys_create_list_revoke(tmp_path):
    db = str(tmp_path / "m.db")
    r = run("keys", "create", "--tenant", "acme", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["key"].startswith("ps-") and made["tenant"] == "acme"
    listed = json.loads(run("keys", "list", "--db", db, "--json").stdout)["keys"]
    assert [(k["key_id"], k["tenant"], k["revoked"]) for k in listed] == [(made["key_id"], "acme", None)]
    assert made["key"] not in json.dumps(listed)
    assert run("keys", "revoke", made["key_id"], "--db", db).returncode == 0
    r = run("keys", "revoke", made["key_id"], "--db", db)
    assert r.returncode == 2 and "no active key" in r.stderr
    r = run("keys", "create", "--tenant", "a/b", "--db", db)
    assert r.returncode == 2 and "tenant" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_no_auth_off_loopback(tmp_path):
    r = run("serve", "--backend", "fake", "--embedder", "hash", "--db", str(tmp_path / "m.db"),
            "--host", "0.0.0.0", "--no-auth")
    assert r.returncode == 2 and "loopback" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_keys_answers_the_openai_client(tmp_path):
    db = str(tmp_path / "m.db")
    key = json.loads(run("keys", "create", "--tenant", "T", "--db", db, "--json").stdout)["key"]
    old = json.loads(run("keys", "create", "--tenant", "T", "--db", db, "--json").stdout)
    assert run("keys", "revoke", old["key_id"], "--db", db).returncode == 0
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_process([*CLI, "serve", "--backend", "fake", "--embedder", "hash", "--db", db,
                          "--port", str(port), "--log-level", "warning"], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base, proc, log)
        c = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        model = c.models.list().data[0].id
        out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=5)
        assert out.choices[0].message.content and out.usage.completion_tokens <= 5
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {old['key']}"}).status_code == 401
    finally:
        stop_process(proc)
    assert f"http://127.0.0.1:{port}/v1" in log.read_text()
