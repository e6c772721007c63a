"""The page at / in a real headless browser: Debian's chromium driven by Playwright (its own
browser download is not used: ``executable_path`` is the system chromium). A person types a prompt,
sees two answers, clicks the one they prefer, and watches the profile (attributes and the gain
chart) change. Skipped only when chromium or Playwright is absent (CI installs both: .ci/run).

    PREFSTEER_SCREENSHOT=page.png pytest tests/test_service_web.py    # also keep a screenshot
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

from prefsteer.memory import Memory  # noqa: E402
from prefsteer.service import Settings, store  # noqa: E402
from tests.test_service_helpers import thread_server  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
USER = "web-maya"
EGG = ["How do I boil an egg?", "How long should I boil an egg?", "What is the best way to cook eggs?",
       "Tips for boiling eggs, please.", "How do I make soft-boiled eggs?"]
SLEEP = ["How can I sleep better?", "Why do I wake up at night?", "Tips for falling asleep faster?",
         "Is napping good for me?", "How many hours should I sleep?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("web") / "m.db")
    mem = Memory(db)
    key = store.create_key(mem, "web")["key"]
    mem.close()
    with thread_server(Settings(db=db, backend="fake", embedder="hash", default_max_tokens=24)) as base:
        yield {"base": base, "key": key}


@pytest.fixture(scope="module")
def page():
    with playwright.sync_playwright() as p:
        # no sandbox: CI runs as root in a container, where chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def ask_and_pick(page, prompts: list[str], choice: int) -> str:
    """Ask the first prompt whose two answers differ and are not empty (the fake model's greedy
    answer to some prompts is empty), click answer ``choice``; the prompt asked."""
    for prompt in prompts:
        page.fill("#prompt", prompt)
        page.click("#ask")
        page.wait_for_selector("#pair", state="visible")
        a, b = page.inner_text("#a0").strip(), page.inner_text("#a1").strip()
        if a and b and a != b:
            break
    else:
        raise AssertionError(f"no prompt of {prompts} got two different answers")
    page.click(f"#pick{choice}")
    page.wait_for_selector("#pair", state="hidden")  # the pair is answered: it goes away
    page.wait_for_function("document.getElementById('status').textContent.includes('feedback done')")
    return prompt


def shown_profile(page) -> list[tuple[str, list[str]]]:
    return page.eval_on_selector_all(
        "#profile .entry", "es => es.map(e => [e.querySelector('.prompt').textContent, "
                           "[...e.querySelectorAll('.attr .name')].map(a => a.textContent)])")


def test_page_feedback_by_clicking_updates_the_profile(server, page):
    page.goto(server["base"] + "/")
    assert "prefsteer" in page.title()
    page.fill("#key", server["key"])
    page.fill("#user", USER)
    page.dispatch_event("#user", "change")
    page.wait_for_function("document.getElementById('profile').textContent.includes('no feedback yet')")

    p1 = ask_and_pick(page, EGG, 0)
    page.wait_for_selector("#profile .entry .bar")
    first = shown_profile(page)
    api = httpx.get(server["base"] + f"/v1/users/{USER}/profile",
                    headers={"Authorization": f"Bearer {server['key']}"}).json()
    # what the page shows is the user's profile: each entry's prompt and selected attributes
    assert [(p, a) for p, a in first] == [(e["prompt"], e["attributes"]) for e in api["entries"]]
    assert len(first) == 1 and first[0][1], first
    assert page.locator("#profile .entry .bar").count() == len(first[0][1])  # one bar per attribute's gain

    p2 = ask_and_pick(page, SLEEP, 1)
    page.wait_for_function("document.querySelectorAll('#profile .entry').length === 2")
    second = shown_profile(page)
    assert second[:1] == first or second[1:] == first  # the new entry is added, the old one kept
    assert {p for p, _ in second} == {p1, p2}
    assert "2 preference pairs" in page.inner_text("#profile")
    if os.environ.get("PREFSTEER_SCREENSHOT"):
        page.screenshot(path=os.environ["PREFSTEER_SCREENSHOT"], full_page=True)
