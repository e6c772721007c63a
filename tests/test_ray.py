"""`prefsteer index --executor ray`: EXACT's selections on Ray workers, the same memory as serial.

A local Ray instance with 2 CPUs and 2 workers (the fake backend) is started once for the module;
skipped where Ray is not installed (`pip install 'prefsteer[ray]'`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from prefsteer.cli import main  # noqa: E402
from prefsteer.storage import Memory  # noqa: E402

DATA = str(Path(__file__).resolve().parents[1] / "src" / "prefsteer" / "resources" / "demo_pairs.jsonl")
COMMON = ["--backend", "fake", "--embedder", "hash", "--quiet", "--k", "2"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _memory(db: Path | str) -> dict:
    mem = Memory(str(db))
    out = {}
    for u in mem.users():
        out[u] = (sorted((e.prompt, tuple(e.attributes), round(e.objective, 9)) for e in mem.entries(u)),
                  mem.user_status(u), sorted(p.pair_id for p in mem.pairs(u)))
    return out


def _selections(db: Path) -> list:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        table = next(t for t in tables if "selection" in t)
        return sorted(map(repr, con.execute(f"select * from {table}").fetchall()))


def test_ray_index_equals_serial(tmp_path):
    assert main(["index", *COMMON, "--data", DATA, "--db", str(tmp_path / "s.db")]) == 0
    assert main(["index", *COMMON, "--executor", "ray", "--workers", "2", "--data", DATA,
                 "--db", str(tmp_path / "r.db")]) == 0
    serial, distributed = _memory(tmp_path / "s.db"), _memory(tmp_path / "r.db")
    assert serial and serial == distributed
    assert all(status == "ready" for _, status, _ in distributed.values())
    assert _selections(tmp_path / "s.db") == _selections(tmp_path / "r.db")


def test_ray_index_into_postgresql_equals_serial_into_sqlite(tmp_path, postgres):
    url = postgres.new_database()
    assert main(["index", *COMMON, "--data", DATA, "--db", str(tmp_path / "s.db")]) == 0
    assert main(["index", *COMMON, "--executor", "ray", "--workers", "2", "--data", DATA, "--db", url]) == 0
    serial, distributed = _memory(tmp_path / "s.db"), _memory(url)  # the driver wrote PostgreSQL
    assert serial and serial == distributed
    assert Memory(str(tmp_path / "s.db")).all_selections() == Memory(url).all_selections()


def test_ray_resumes_from_stored_selections_and_writes_them_as_they_come(tmp_path, monkeypatch):
    from prefsteer.executors import RayExecutor

    db = str(tmp_path / "r.db")
    calls = []
    real = RayExecutor.select_missing

    def counting(self, method, pools, progress=False):
        out = real(self, method, pools, progress)
        calls.append(out)
        return out

    monkeypatch.setattr(RayExecutor, "select_missing", counting)
    assert main(["index", *COMMON, "--executor", "ray", "--workers", "2", "--data", DATA, "--db", db]) == 0
    first = _memory(tmp_path / "r.db")
    # a second run (as after an interruption) finds every selection stored and computes nothing
    assert main(["index", *COMMON, "--executor", "ray", "--workers", "1", "--data", DATA, "--db", db]) == 0
    assert calls[0]["selected"] > 0 and calls[1]["selected"] == 0 and calls[1]["reused"] > 0
    assert _memory(tmp_path / "r.db") == first


def test_ray_refuses_methods_other_than_exact(tmp_path, capsys):
    rc = main(["index", "--backend", "fake", "--embedder", "hash", "--quiet", "--method", "exact-global",
               "--executor", "ray", "--data", DATA, "--db", str(tmp_path / "x.db")])
    assert rc == 2
    assert "--executor ray" in capsys.readouterr().err
