"""The pages for people in a real headless browser: Debian's chromium driven by Playwright (its own
browser download is not used: ``executable_path`` is the system chromium). At /, a person types a
prompt, watches two answers stream in, clicks the one they prefer, and watches the profile
(attributes and the gain chart) change; /docs renders with no network. Skipped only when chromium
or Playwright is absent (CI installs both: .ci/run).

    PREFSTEER_SCREENSHOT=page.png pytest -m slow tests/test_service_web.py    # also keep a screenshot
"""

from __future__ import annotations

import json
import os
import shutil
from urllib.parse import urlparse

import httpx
import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

from prefsteer.storage import Memory  # noqa: E402
from prefsteer.service import Settings, store  # noqa: E402
from tests.test_service_helpers import thread_server, wait_job  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
USER = "web-maya"
EGG = ["How do I boil an egg?", "How long should I boil an egg?", "What is the best way to cook eggs?",
       "Tips for boiling eggs, please.", "How do I make soft-boiled eggs?"]
SLEEP = ["How can I sleep better?", "Why do I wake up at night?", "Tips for falling asleep faster?",
         "Is napping good for me?", "How many hours should I sleep?"]
PAIR = {"prompt": "How do I boil an egg?", "chosen": "Boil it for seven minutes, then cool it in ice water.",
        "rejected": "Eggs are a food."}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("web") / "m.db")
    mem = Memory(db)
    key = mem.create_key("web")["key"]
    mem.close()
    with thread_server(Settings(db=db, backend="fake", embedder="hash", default_max_tokens=24)) as base:
        yield {"base": base, "key": key, "auth": {"Authorization": f"Bearer {key}"}}


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        # no sandbox: CI runs as root in a container, where chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own localStorage) for each test."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


def open_page(page, server, user: str, key: str | None = "") -> None:
    """The page at /, as ``user`` with ``key`` (the server's key when ""; None: no key typed)."""
    page.goto(server["base"] + "/")
    if key is not None:
        page.fill("#key", key or server["key"])
    page.fill("#user", user)
    page.dispatch_event("#user", "change")


def sent_to(page, path: str, method: str = "POST") -> list:
    """The requests the page sends from now on to a URL ending with ``path``, as they are sent."""
    sent = []
    page.on("request", lambda r: sent.append(r) if r.method == method and r.url.endswith(path) else None)
    return sent


def give_feedback(server, user: str) -> None:
    with httpx.Client(base_url=server["base"], headers=server["auth"]) as c:
        job = c.post(f"/v1/users/{user}/feedback", json={"pairs": [PAIR]}).json()
        assert wait_job(c, job["job_id"])["status"] == "done"


def answer(server, body: dict) -> dict:
    """The non-streamed API's answer to a request the page streamed."""
    r = httpx.post(server["base"] + "/v1/chat/completions", json={**body, "stream": False},
                   headers=server["auth"], timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def streamed_pieces(server, body: dict) -> list[str]:
    """The non-empty text pieces of the API's stream for ``body``, in order."""
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, headers=server["auth"],
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [json.loads(line[6:]) for line in lines]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return [d["content"] for d in deltas if d.get("content")]


def ask(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#ask")  # disables the button until both answers have arrived (or failed)
    page.wait_for_function("!document.getElementById('ask').disabled")


def box_texts(page) -> list[str]:
    return [page.text_content("#a0"), page.text_content("#a1")]


def ask_pair(page, server, chats: list, prompts: list[str]) -> tuple[str, int, dict]:
    """Ask the first prompt whose two answers differ and are not empty (the fake model's greedy
    answer to some prompts is empty); the prompt, the side showing the personalized (greedy)
    answer, and the non-streamed API's answer to that request."""
    for prompt in prompts:
        ask(page, prompt)
        assert page.is_visible("#pair") and page.is_enabled("#pick0") and page.is_enabled("#pick1")
        texts = box_texts(page)
        a, b = (t.strip() for t in texts)
        if a and b and a != b:
            break
    else:
        raise AssertionError(f"no prompt of {prompts} got two different answers")
    mine, plain = sorted((r.post_data_json for r in chats[-2:]), key=lambda b: "prefsteer" in b)
    mine_answer = answer(server, mine)
    return prompt, texts.index(mine_answer["choices"][0]["message"]["content"]), mine_answer


def pick(page, choice: int) -> None:
    page.click(f"#pick{choice}")
    page.wait_for_selector("#pair", state="hidden")  # the pair is answered: it goes away
    page.wait_for_function("document.getElementById('job').textContent.includes('feedback learned')")


def shown_profile(page) -> list[tuple[str, list[str]]]:
    return page.eval_on_selector_all(
        "#profile .entry", "es => es.map(e => [e.querySelector('.prompt').textContent, "
                           "[...e.querySelectorAll('.attr .name')].map(a => a.textContent)])")


def summary(page, group: str) -> list[tuple[str, str]]:
    """The profile summary's ``group`` ("selected" or "away"): (attribute, number shown) per bar."""
    # each bar is a row of three cells: name, track, number
    return [tuple(x) for x in page.eval_on_selector_all(
        f"#profile .summary.{group} .name", "ns => ns.map(n => [n.textContent, n.nextSibling.nextSibling.textContent])")]


def expected_summary(profile: dict) -> dict[str, list[tuple[str, str]]]:
    total: dict[str, float] = {}
    for e in profile["entries"]:
        for a, g in zip(e["attributes"], e["gains"]):
            total[a] = total.get(a, 0.0) + g
    return {"selected": [(a, f"{total[a]:+.3f}") for a in sorted(total, key=lambda a: -total[a]) if total[a] >= 0],
            "away": [(a, f"{total[a]:+.3f}") for a in sorted(total, key=lambda a: total[a]) if total[a] < 0]}


def test_page_feedback_by_clicking_updates_the_profile(server, page):
    chats = sent_to(page, "/v1/chat/completions")
    open_page(page, server, USER)
    assert "prefsteer" in page.title()
    page.wait_for_function("document.getElementById('profile').textContent.includes('no feedback yet')")
    assert page.is_hidden("#tally")

    p1, mine, api_answer = ask_pair(page, server, chats, EGG)
    assert api_answer["prefsteer"]["method"] == "none"  # no profile yet: the greedy answer is plain too
    pick(page, 0)
    # which answer was preferred stays on the page once the feedback is learned
    kind = "plain (no profile yet)" if mine == 0 else "plain, sampled"
    assert page.text_content("#picked") == f"you preferred the {kind} answer"
    assert page.text_content("#tally") == ("your picks this session: personalized 0 · plain 0 (and 1 before you "
                                           "had a profile, when both answers were plain)")
    page.wait_for_selector("#profile .entry .bar")
    first = shown_profile(page)
    api = httpx.get(server["base"] + f"/v1/users/{USER}/profile", headers=server["auth"]).json()
    # what the page shows is the user's profile: each entry's prompt and selected attributes
    assert [(p, a) for p, a in first] == [(e["prompt"], e["attributes"]) for e in api["entries"]]
    assert len(first) == 1 and first[0][1], first
    assert page.locator("#profile .entry .bar").count() == len(first[0][1])  # one bar per attribute's gain
    # the summary's bars carry their summed gains, positive and negative ones apart
    want = expected_summary(api)
    assert summary(page, "selected") == want["selected"] and summary(page, "away") == want["away"]
    assert len(want["selected"]) + len(want["away"]) == len(set(first[0][1]))

    p2, mine, api_answer = ask_pair(page, server, chats, SLEEP)
    assert api_answer["prefsteer"]["method"] == "exact"  # the profile exists: personalized
    pick(page, 1)
    kind = "personalized (exact)" if mine == 1 else "plain, sampled"
    assert page.text_content("#picked") == f"you preferred the {kind} answer"
    assert page.text_content("#tally").startswith(
        "your picks this session: " + ("personalized 1 · plain 0" if mine == 1 else "personalized 0 · plain 1")
        + " (and 1 before you had a profile")
    page.wait_for_function("document.querySelectorAll('#profile .entry').length === 2")
    second = shown_profile(page)
    assert second[:1] == first or second[1:] == first  # the new entry is added, the old one kept
    assert {p for p, _ in second} == {p1, p2}
    assert "2 preference pairs" in page.inner_text("#profile")
    api = httpx.get(server["base"] + f"/v1/users/{USER}/profile", headers=server["auth"]).json()
    want = expected_summary(api)
    assert summary(page, "selected") == want["selected"] and summary(page, "away") == want["away"]
    if os.environ.get("PREFSTEER_SCREENSHOT"):
        page.screenshot(path=os.environ["PREFSTEER_SCREENSHOT"], full_page=True)


def test_answers_stream_into_the_page_as_the_api_gives_them(server, page):
    user = "web-stream"
    give_feedback(server, user)
    chats = sent_to(page, "/v1/chat/completions")
    open_page(page, server, user)
    page.wait_for_selector("#profile .entry")
    ask(page, "How long should I boil an egg?")
    assert len(chats) == 2
    bodies = [r.post_data_json for r in chats]
    assert all(b["stream"] is True and b["messages"] == [{"role": "user", "content": "How long should I boil an egg?"}]
               and b["user"] == user for b in bodies)
    mine, plain = sorted(bodies, key=lambda b: "prefsteer" in b)
    assert "temperature" not in mine  # greedy: the personalized answer
    assert plain["prefsteer"] == {"method": "none"} and plain["temperature"] == 1.0 and isinstance(plain["seed"], int)
    # the final text of each answer is the non-streamed API's answer to the same request
    mine_answer, plain_answer = answer(server, mine), answer(server, plain)
    assert mine_answer["prefsteer"]["method"] == "exact"
    texts = box_texts(page)
    assert sorted(texts) == sorted(a["choices"][0]["message"]["content"] for a in (mine_answer, plain_answer))
    assert all(t.strip() for t in texts)
    # each piece was appended as its chunk arrived: one text node per chunk of the API's stream
    nodes = [page.eval_on_selector(f"#a{i}", "p => [...p.childNodes].map(n => n.textContent)") for i in (0, 1)]
    side = texts.index(mine_answer["choices"][0]["message"]["content"])
    assert nodes[side] == streamed_pieces(server, mine) and nodes[1 - side] == streamed_pieces(server, plain)
    assert len(nodes[side]) > 1


def test_the_stream_reader_joins_chunks_split_across_reads(server, page):
    open_page(page, server, "web-reader")
    pieces = ["Hé", "llo, wörld", " 🙂 ", "", "done."]
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
               "prefsteer": {"method": "exact", "attributes": ["Concise"]}}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, {"choices": [], "usage": {}}]
    sse = "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks)
    read = """async ([sse, size]) => {
      const bytes = new TextEncoder().encode(sse); let at = 0;
      const body = new ReadableStream({pull(c) {
        if (at >= bytes.length) { c.close(); return; }
        c.enqueue(bytes.slice(at, at + size)); at += size; }});
      const got = [];
      try { const r = await readEvents(body, p => got.push(p)); return {text: r.text, info: r.info, got}; }
      catch (e) { return {error: e.message, got}; }
    }"""
    # reads of 1, 2, 3, 7 bytes split lines, JSON and UTF-8 characters (é, ö, 🙂 are 2 to 4 bytes)
    for size in (1, 2, 3, 7, len(sse.encode()) + 10):
        out = page.evaluate(read, [sse + "data: [DONE]\n\n", size])
        assert out == {"text": "".join(pieces), "info": chunks[0]["prefsteer"], "got": [p for p in pieces if p]}, size
    # an error in the stream, and a stream that ends before [DONE], are errors
    err = page.evaluate(read, ["data: " + json.dumps({"error": {"message": "generation failed: X"}}) + "\n\n", 5])
    assert err == {"error": "generation failed: X", "got": []}
    cut = page.evaluate(read, [sse, 4])
    assert cut["error"] == "the answer was cut off" and cut["got"] == [p for p in pieces if p]


def test_errors_are_shown_to_the_person(server, page):
    open_page(page, server, "web-errors")
    page.wait_for_function("document.getElementById('profile').textContent.includes('no feedback yet')")
    # the server refuses the request (413, a JSON error body): its message is shown
    ask(page, "x" * 33_000)
    assert page.text_content("#status") == ("error: the messages have 33000 characters, more than the limit of "
                                            "32000 (max_prompt_chars)")
    assert page.is_hidden("#pair")
    # the answer fails after it began: the error event in the stream is shown
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body='data: {"error": {"message": "generation failed: RuntimeError", "type": "server_error"}}\n\n'))
    ask(page, "How do I boil an egg?")
    assert page.text_content("#status") == "error: generation failed: RuntimeError"
    assert page.is_hidden("#pair")


def test_profile_keeps_negative_gains_apart(server, page):
    profile = {"user_id": "web-gains", "status": "ready", "pairs": 2, "methods": [], "pending_jobs": [], "entries": [
        {"prompt": "Review my essay", "pair_id": "p1", "attributes": ["Concise", "Critical"], "gains": [0.8, -2.64],
         "objective": 1.0, "base_objective": 0.5},
        {"prompt": "Plan my week", "pair_id": "p2", "attributes": ["Concise", "Friendly"], "gains": [0.4, 0.3],
         "objective": 1.0, "base_objective": 0.5}]}
    page.route("**/v1/users/web-gains/profile", lambda route: route.fulfill(json=profile))
    open_page(page, server, "web-gains")
    page.wait_for_selector("#profile .entry")
    assert summary(page, "selected") == [("Concise", "+1.200"), ("Friendly", "+0.300")]
    assert summary(page, "away") == [("Critical", "-2.640")]
    labels = page.eval_on_selector_all("#profile .summary", "ss => ss.map(s => s.previousSibling.textContent)")
    assert labels[0].startswith("attributes selected for you") and labels[1].startswith("steered away from")
    # bars on one scale; a negative one is drawn hatched, not filled like a preference
    bars = page.eval_on_selector_all("#profile .summary .bar", """bs => bs.map(b => [b.style.width,
        getComputedStyle(b).backgroundImage.startsWith('repeating-linear-gradient'),
        getComputedStyle(b).backgroundColor])""")
    assert [w for w, _, _ in bars] == ["45.5%", "11.4%", "100%"]
    assert [hatched for _, hatched, _ in bars] == [False, False, True]
    assert bars[0][2] == bars[1][2] != bars[2][2]
    # each entry's bars carry their own gains
    gains = page.eval_on_selector_all("#profile .entry .gain", "gs => gs.map(g => g.textContent)")
    assert gains == ["+0.800", "-2.640", "+0.400", "+0.300"]


def test_the_profile_shown_is_of_the_last_user_asked_for(server, page):
    give_feedback(server, "web-second")
    held = []  # the first user's profile answers only when the test says so
    page.route("**/v1/users/web-first/profile", lambda route: held.append(route))
    open_page(page, server, "web-first")
    while not held:
        page.wait_for_timeout(20)
    page.fill("#user", "web-second")
    page.dispatch_event("#user", "change")
    page.wait_for_selector("#profile .entry")
    held[0].fulfill(status=404, json={"error": {"message": "user 'web-first' not found"}})
    page.wait_for_timeout(300)  # the late answer for the first user would have been drawn by now
    assert page.locator("#profile .entry").count() == 1 and not page.is_disabled("#forget")


def test_a_double_click_submits_one_pick(server, page):
    feedback = sent_to(page, "/v1/users/web-double/feedback")
    chats = sent_to(page, "/v1/chat/completions")
    open_page(page, server, "web-double")
    ask_pair(page, server, chats, EGG)
    page.dblclick("#pick0")
    page.wait_for_function("document.getElementById('job').textContent.includes('feedback learned')")
    assert len(feedback) == 1
    api = httpx.get(server["base"] + "/v1/users/web-double/profile", headers=server["auth"]).json()
    assert api["pairs"] == 1
    assert page.is_disabled("#pick0") and page.is_disabled("#pick1")


def test_an_empty_prompt_is_not_sent(server, page):
    chats = sent_to(page, "/v1/chat/completions")
    open_page(page, server, "web-empty")
    for prompt in ("", "  \n\t "):
        page.fill("#prompt", prompt)
        page.click("#ask")
        assert page.text_content("#status") == "type a prompt first"
        assert page.is_hidden("#pair") and page.is_enabled("#ask")
    page.wait_for_timeout(300)  # a request sent anyway would be seen by now
    assert chats == []


def test_without_a_key_the_page_asks_for_the_key_given(server, page):
    profile_calls = sent_to(page, "/profile", "GET")
    open_page(page, server, "web-nokey", key=None)
    box = "document.getElementById('profile').textContent"
    page.wait_for_function(f"{box}.includes('API key')")
    assert page.text_content("#profile") == "enter the API key you were given to see your profile"
    assert profile_calls == []  # not asked without a key
    ask(page, "How do I boil an egg?")  # the server answers 401
    assert page.text_content("#status") == "error: enter the API key you were given"
    # a key the server does not know: a 401 for the profile too
    page.fill("#key", "ps-not-a-key")
    page.dispatch_event("#key", "change")
    page.wait_for_function(f"{box}.includes('not accepted')")
    assert page.text_content("#profile") == "this API key was not accepted: check that it is the one you were given"
    assert len(profile_calls) == 1
    text = page.inner_text("body")
    assert "keys create" not in text and "Bearer" not in text  # nothing meant for the operator


def test_delete_my_data(server, page):
    user = "web-forget"
    give_feedback(server, user)
    deletes = sent_to(page, f"/v1/users/{user}", "DELETE")
    open_page(page, server, user)
    page.wait_for_selector("#profile .entry")
    dialogs = []
    page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.click("#forget")
    page.wait_for_timeout(300)
    assert len(dialogs) == 1 and user in dialogs[0]
    assert deletes == [] and page.locator("#profile .entry").count() == 1  # dismissed: nothing deleted
    page.once("dialog", lambda d: d.accept())
    page.click("#forget")
    page.wait_for_function("document.getElementById('profile').textContent === 'no feedback yet'")
    assert len(deletes) == 1
    assert page.text_content("#status") == "deleted your data: 1 preference pair and all that was learned from them"
    assert page.is_disabled("#forget")
    r = httpx.get(server["base"] + f"/v1/users/{user}/profile", headers=server["auth"])
    assert r.status_code == 404


def test_docs_render_offline(server, page):
    blocked = []

    def loopback_only(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", loopback_only)
    page.goto(server["base"] + "/docs")
    page.wait_for_selector(".opblock")
    shown = set(page.eval_on_selector_all(
        ".opblock", "os => os.map(o => o.querySelector('.opblock-summary-method').textContent + ' ' + "
                    "o.querySelector('.opblock-summary-path').getAttribute('data-path'))"))
    spec = httpx.get(server["base"] + "/openapi.json").json()
    assert shown == {f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops}
    assert "POST /v1/chat/completions" in shown
    assert blocked == []  # nothing was wanted from outside
    assert httpx.get(server["base"] + "/redoc").status_code == 404  # ReDoc would need a CDN
