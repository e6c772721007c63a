"""A bounded Schemathesis run against the service's own OpenAPI schema (fake backend, a valid key):
every operation gets a few dozen generated requests; no answer may be a 5xx or break the schema
(status codes, content types, headers and bodies as declared). Bounded: ``MAX_EXAMPLES`` per
operation, a per-example deadline, no shrinking past the first failure's report.

    pytest tests/test_service_fuzz.py            # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)
from schemathesis.checks import not_a_server_error  # noqa: E402

from prefsteer.storage import Memory  # noqa: E402
from prefsteer.service import Settings, store  # noqa: E402
from tests.test_service_helpers import thread_server, wait_job  # noqa: E402

MAX_EXAMPLES = 30
USER = "fuzz-user"
# refused by design (400, checked in test_service.py): left out of the aimed cases
UNSUPPORTED = ("n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("fuzz") / "m.db")
    mem = Memory(db)
    key = mem.create_key("fuzz")["key"]
    mem.close()
    # small generations and limits: a generated max_tokens or text stays cheap on the fake model; a
    # rate limit the fuzz never reaches (it sends as fast as it can: 429s would replace its answers)
    s = Settings(db=db, backend="fake", embedder="hash", default_max_tokens=8, max_tokens_limit=16,
                 max_prompt_chars=4000, max_text_chars=1000, max_pairs_per_request=5, max_body_bytes=200_000,
                 rate_limit=100_000, rate_burst=10_000)
    with thread_server(s) as base:
        headers = {"Authorization": f"Bearer {key}"}
        pair = {"prompt": "How do I boil an egg?", "chosen": "9 minutes.", "rejected": "Eggs are magic!!"}
        r = httpx.post(base + f"/v1/users/{USER}/feedback", json={"pairs": [pair]}, headers=headers)
        job = wait_job(httpx.Client(base_url=base), r.json()["job_id"], headers)
        assert job["status"] == "done", job
        yield {"base": base, "headers": headers, "job_id": job["job_id"], "statuses": {}}


def _aimed(case, hit: bool, job_id: str):
    """Half of the cases aimed at what exists (the served model, the fuzz user, its job), so the
    fuzz reaches the 2xx paths too, not only the 404s of random names."""
    if hit:
        if isinstance(case.body, dict) and "model" in case.body:  # a chat request
            body = {k: v for k, v in case.body.items() if k not in UNSUPPORTED}
            body["model"] = "fake"
            body["messages"] = [*body.get("messages", []), {"role": "user", "content": "How do I fry an egg?"}]
            if body.get("user") is not None:
                body["user"] = USER
            if isinstance(body.get("prefsteer"), dict) and body["prefsteer"].get("user_id") is not None:
                body["prefsteer"] = {**body["prefsteer"], "user_id": USER}
            case.body = body
        params = dict(case.path_parameters or {})
        for name, value in (("user_id", USER), ("job_id", job_id)):
            if name in params:
                params[name] = value
        case.path_parameters = params


def _schema():
    """The schema the app serves at /openapi.json (it needs no model: built without the lifespan)."""
    from prefsteer.service import create_app

    return create_app(Settings(db=":memory:", backend="fake", embedder="hash", auth=False)).openapi()


SCHEMA = schemathesis.openapi.from_dict(_schema())
OPERATIONS = [r.ok().label for r in SCHEMA.get_all_operations()]


# Schemathesis's own pytest plugin (`from_fixture` / `parametrize`) does not run under pytest 9
# (it sets `Function._nodeid`): each operation is a plain parametrized test driving Hypothesis.
@pytest.mark.parametrize("label", OPERATIONS)
def test_service_answers_conform_to_its_openapi_schema(label, fuzz_server):
    from hypothesis import given

    operation = SCHEMA.find_operation_by_label(label)

    @given(case=operation.as_strategy(), hit=st.booleans())
    @settings(max_examples=MAX_EXAMPLES, deadline=5000, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case, hit):
        _aimed(case, hit, fuzz_server["job_id"])
        r = case.call_and_validate(base_url=fuzz_server["base"], headers=fuzz_server["headers"], checks=CHECKS,
                                   timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1

    seen: dict[int, int] = {}
    check()
    # not only refusals: some generated requests were valid and answered
    assert any(200 <= c < 300 for c in seen) or label == "DELETE /v1/users/{user_id}", seen
