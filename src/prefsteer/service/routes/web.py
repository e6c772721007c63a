"""Pages for people. GET /: a page to try the service by hand. A person types a prompt, watches two
answers stream in, in random order (the personalized one and a sampled plain one), clicks the one
they prefer, and watches the profile update: the attributes selected, with their gains as a small
bar chart. GET /docs: Swagger UI, its files served from the `fastapi-swagger` package, so it
works without a network.

Server-rendered HTML with a little inline script that calls the same /v1 API as any client; no
build step, no external files. With keys required, the page asks for one (kept in the browser's
localStorage only).
"""

from __future__ import annotations

import html
import json
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from prefsteer.service.auth import engine
from prefsteer.service.errors import ApiError

router = APIRouter()

# Swagger UI's files, as the `fastapi-swagger` package ships them (FastAPI's own /docs loads them
# from a CDN, which leaves the page blank without a network)
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefsteer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 :root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg2:#f6f8fa;--acc:#0969da;--pos:#2da44e;--neg:#cf222e}
 *{box-sizing:border-box} [hidden]{display:none !important}
 body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:64rem;margin:0 auto;padding:1.5rem 1rem 3rem;color:var(--fg)}
 header{display:flex;align-items:baseline;gap:.8rem;border-bottom:1px solid var(--line);padding-bottom:.6rem;margin-bottom:1rem}
 h1{font-size:1.35rem;margin:0} h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
 .muted{color:var(--muted);font-size:.9em} code{background:var(--bg2);padding:.05rem .3rem;border-radius:4px}
 .row{display:flex;flex-wrap:wrap;gap:1rem;margin-bottom:.7rem} .row label{display:flex;flex-direction:column;font-size:.85em;color:var(--muted)}
 input,textarea{font:inherit;color:inherit;border:1px solid var(--line);border-radius:6px;padding:.35rem .5rem}
 textarea{width:100%;height:4.2rem;resize:vertical}
 button{font:inherit;cursor:pointer;border:1px solid var(--line);border-radius:6px;padding:.35rem .9rem;background:var(--bg2)}
 button.primary{background:var(--acc);border-color:var(--acc);color:#fff} button:disabled{opacity:.5;cursor:default}
 .actions{display:flex;align-items:center;gap:.8rem;margin:.6rem 0}
 .pair{display:grid;grid-template-columns:1fr 1fr;gap:1rem;margin:1rem 0}
 .answer{border:1px solid var(--line);border-radius:8px;padding:.8rem 1rem;display:flex;flex-direction:column}
 .answer h3{margin:0 0 .3rem;font-size:.85em;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
 .answer p{white-space:pre-wrap;flex:1;margin:0 0 .8rem}
 #status{min-height:1.4rem} #picked{font-weight:600}
 .summary{display:grid;grid-template-columns:max-content 1fr 4.5rem;gap:.25rem .8rem;align-items:center;margin:.4rem 0 1rem}
 .track{background:var(--bg2);border-radius:3px;height:.8rem;position:relative}
 .bar{display:block;height:.8rem;border-radius:3px;background:var(--pos)}
 .bar.neg{background:repeating-linear-gradient(135deg,var(--neg) 0 3px,transparent 3px 6px);box-shadow:inset 0 0 0 1px var(--neg)}
 .gain{text-align:right;font-variant-numeric:tabular-nums;color:var(--muted)}
 .entry{border:1px solid var(--line);border-radius:8px;padding:.6rem .9rem;margin:.6rem 0}
 .entry .prompt{font-weight:600;margin-bottom:.3rem}
 .attr{display:grid;grid-template-columns:10rem 1fr 4.5rem;gap:.6rem;align-items:center;font-size:.92em}
 @media (max-width:40rem){.pair{grid-template-columns:1fr}}
</style></head><body>
<header><h1>prefsteer</h1><span class="muted">personalized answers from your preferences &middot; serving <code>__MODEL__</code>
 &middot; <a href="docs">API docs</a></span></header>
<div class="row">
 <label>User id<input id="user" value="me" size="18"></label>
 <label __KEYSTYLE__>API key<input id="key" type="password" size="34" placeholder="ps-..."></label>
</div>
<textarea id="prompt" placeholder="Ask something...">Give me some advice for my first job interview.</textarea>
<div class="actions"><button id="ask" class="primary">Get two answers</button>
 <span class="muted">one is personalized for you, one is plain; click the one you prefer</span></div>
<div class="pair" id="pair" hidden>
 <div class="answer"><h3>Answer 1</h3><p id="a0"></p><button id="pick0" disabled>I prefer answer 1</button></div>
 <div class="answer"><h3>Answer 2</h3><p id="a1"></p><button id="pick1" disabled>I prefer answer 2</button></div>
</div>
<div id="status" class="muted"></div>
<div><span id="picked"></span> <span id="job" class="muted"></span></div>
<div id="tally" class="muted" hidden></div>
<h2>Your profile</h2>
<div id="profile" class="muted">no feedback yet</div>
<div class="actions"><button id="forget" disabled>Delete my data</button>
 <span class="muted">removes your feedback and everything learned from it</span></div>
<script>
const $ = id => document.getElementById(id);
const MODEL = __MODEL_JSON__, AUTH = __AUTH_JSON__;
$("key").value = localStorage.getItem("prefsteer-key") || "";
$("user").value = localStorage.getItem("prefsteer-user") || $("user").value;
let shown = null;  // the pair on screen, until it is picked
let tally = {personalized: 0, plain: 0, before: 0};  // this session's picks
function headers() {
  localStorage.setItem("prefsteer-key", $("key").value); localStorage.setItem("prefsteer-user", $("user").value);
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
// an answer other than 2xx as an Error, in the person's terms where the server's are an operator's
async function failure(r) {
  const data = await r.json().catch(() => ({}));
  const message = r.status !== 401 ? (data.error && data.error.message) || "HTTP " + r.status :
    $("key").value.trim() ? "this API key was not accepted: check that it is the one you were given"
                          : "enter the API key you were given";
  const e = new Error(message); e.status = r.status; return e;
}
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(), body: body ? JSON.stringify(body) : undefined});
  if (!r.ok) throw await failure(r);
  return r.json();
}
// OpenAI's server-sent events: `data: {chunk}` lines, `data: [DONE]` last. A read can end anywhere,
// inside a line or a UTF-8 character: the unfinished tail waits for the next read.
async function readEvents(body, onPiece) {
  const reader = body.getReader(), utf8 = new TextDecoder();
  let buf = "", text = "", info = null;
  for (;;) {
    const {value, done} = await reader.read();
    buf += done ? utf8.decode() : utf8.decode(value, {stream: true});
    const lines = buf.split("\n");
    buf = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return {text, info};
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.prefsteer) info = chunk.prefsteer;
      const piece = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (piece) { text += piece; onPiece(piece); }
    }
    if (done) throw new Error("the answer was cut off");
  }
}
async function streamChat(prompt, extra, onPiece, signal) {
  const body = Object.assign({model: MODEL, max_tokens: 80, stream: true, messages: [{role: "user", content: prompt}]}, extra);
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  if (!r.ok) throw await failure(r);
  return readEvents(r.body, onPiece);
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function setPicks(on) { $("pick0").disabled = $("pick1").disabled = !on; }
$("ask").onclick = async () => {
  const prompt = $("prompt").value;
  if (!prompt.trim()) { $("status").textContent = "type a prompt first"; $("prompt").focus(); return; }
  const user = $("user").value, ctl = new AbortController();
  // the personalized answer goes to a random side, so that a side tells nothing
  const flip = Math.random() < 0.5, boxes = flip ? [$("a1"), $("a0")] : [$("a0"), $("a1")];
  shown = null; setPicks(false); $("ask").disabled = true;
  boxes.forEach(b => { b.textContent = ""; }); $("pair").hidden = false; $("status").textContent = "generating...";
  const into = box => piece => box.append(piece);  // each piece as it arrives
  try {
    const [mine, plain] = await Promise.all([streamChat(prompt, {user}, into(boxes[0]), ctl.signal),
      streamChat(prompt, {user, prefsteer: {method: "none"}, temperature: 1.0, seed: Math.floor(Math.random() * 1e9)},
                 into(boxes[1]), ctl.signal)]);
    const method = (mine.info || {}).method, personalized = method !== "none";
    const answers = [{kind: personalized ? "personalized (" + method + ")" : "plain (no profile yet)", text: mine.text, personalized},
                     {kind: "plain, sampled", text: plain.text, personalized: false}];
    if (flip) answers.reverse();
    shown = {user, prompt, answers, contest: personalized};
    setPicks(true); $("status").textContent = "";
  } catch (e) { ctl.abort(); $("pair").hidden = true; $("status").textContent = "error: " + e.message; }
  $("ask").disabled = false;
};
function showTally() {
  const t = tally;
  $("tally").hidden = !(t.personalized + t.plain + t.before);
  $("tally").textContent = "your picks this session: personalized " + t.personalized + " \u00b7 plain " + t.plain +
    (t.before ? " (and " + t.before + " before you had a profile, when both answers were plain)" : "");
}
async function pick(i) {
  if (!shown) return;
  const s = shown, chosen = s.answers[i], rejected = s.answers[1 - i];
  if (chosen.text.trim() === rejected.text.trim()) { $("status").textContent = "the two answers are the same: ask again"; return; }
  shown = null; setPicks(false);  // one submit per pick: a second click finds nothing to send
  let job;
  try {
    job = await api("POST", "/v1/users/" + encodeURIComponent(s.user) + "/feedback",
      {pairs: [{prompt: s.prompt, chosen: chosen.text, rejected: rejected.text}]});
  } catch (e) { shown = s; setPicks(true); $("status").textContent = "error: " + e.message; return; }
  $("pair").hidden = true; $("status").textContent = "";
  tally[!s.contest ? "before" : chosen.personalized ? "personalized" : "plain"]++; showTally();
  $("picked").textContent = "you preferred the " + chosen.kind + " answer";
  $("job").textContent = "\u00b7 learning from it...";
  try {
    for (let n = 0; n < 600; n++) {
      const j = await api("GET", "/v1/jobs/" + job.job_id);
      if (j.status === "done" || j.status === "failed") {
        $("job").textContent = j.status === "done" ? "\u00b7 feedback learned" : "\u00b7 feedback failed: " + j.error; break; }
      await new Promise(r => setTimeout(r, 500));
    }
    await loadProfile();
  } catch (e) { $("job").textContent = "\u00b7 error: " + e.message; }
}
$("pick0").onclick = () => pick(0); $("pick1").onclick = () => pick(1);
const signed = g => (g >= 0 ? "+" : "") + g.toFixed(3);
function barRow(parent, name, gain, top) {
  const row = el("div", "attr"); row.appendChild(el("span", "name", name));
  const track = el("span", "track"), bar = el("span", "bar" + (gain < 0 ? " neg" : ""));
  bar.style.width = (100 * Math.abs(gain) / top).toFixed(1) + "%"; track.appendChild(bar); row.appendChild(track);
  row.appendChild(el("span", "gain", signed(gain))); parent.appendChild(row);
}
// one group of the summary: a label, then name, bar and summed gain per attribute
function summary(box, cls, label, names, total, top) {
  if (!names.length) return;
  box.appendChild(el("div", "muted", label));
  const sum = el("div", "summary " + cls);
  for (const n of names) {
    sum.appendChild(el("span", "name", n));
    const track = el("span", "track"), bar = el("span", "bar" + (total[n] < 0 ? " neg" : ""));
    bar.style.width = (100 * Math.abs(total[n]) / top).toFixed(1) + "%"; track.appendChild(bar); sum.appendChild(track);
    sum.appendChild(el("span", "gain", signed(total[n])));
  }
  box.appendChild(sum);
}
let profileLoads = 0;
async function loadProfile() {
  let p;
  const box = $("profile"), load = ++profileLoads;
  // the delete button is turned off only once there is nothing to delete: a click on it can be what
  // blurs the user field, whose change reloads the profile
  const none = text => { box.className = "muted"; box.textContent = text; $("forget").disabled = true; };
  if (AUTH && !$("key").value.trim()) return none("enter the API key you were given to see your profile");
  try { p = await api("GET", "/v1/users/" + encodeURIComponent($("user").value) + "/profile"); }
  catch (e) { p = e; }
  if (load !== profileLoads) return;  // a later load (of another user or key) answers instead
  if (p instanceof Error) return none(p.status === 404 ? "no feedback yet" : p.status === 401 ? p.message : "error: " + p.message);
  box.textContent = ""; box.className = ""; $("forget").disabled = false;
  box.appendChild(el("p", "muted", p.pairs + " preference pair" + (p.pairs === 1 ? "" : "s") + ", " + p.entries.length +
    " memory entr" + (p.entries.length === 1 ? "y" : "ies") + (p.pending_jobs.length ? ", " + p.pending_jobs.length + " being indexed" : "")));
  // the attributes across entries and their summed gain (the evidence); a negative sum is evidence
  // against the attribute, so it is shown apart, never as a preference
  const total = {};
  for (const e of p.entries) e.attributes.forEach((a, k) => { total[a] = (total[a] || 0) + e.gains[k]; });
  const names = Object.keys(total), top = Math.max(1e-9, ...names.map(n => Math.abs(total[n])));
  summary(box, "selected", "attributes selected for you, by summed gain (nats)",
          names.filter(n => total[n] >= 0).sort((a, b) => total[b] - total[a]), total, top);
  summary(box, "away", "steered away from: attributes with a negative summed gain (nats)",
          names.filter(n => total[n] < 0).sort((a, b) => total[a] - total[b]), total, top);
  const etop = Math.max(1e-9, ...p.entries.flatMap(e => e.gains.map(Math.abs)));
  for (const e of p.entries) {
    const div = el("div", "entry"); div.appendChild(el("div", "prompt", e.prompt));
    e.attributes.forEach((a, k) => barRow(div, a, e.gains[k], etop));
    box.appendChild(div);
  }
}
$("forget").onclick = async () => {
  const user = $("user").value;
  if (!confirm("Delete everything stored for user \u201c" + user + "\u201d: your preference pairs and all that " +
               "was learned from them? This cannot be undone.")) return;
  $("forget").disabled = true;
  try {
    const d = await api("DELETE", "/v1/users/" + encodeURIComponent(user));
    const n = d.rows.pairs || 0;
    $("status").textContent = "deleted your data: " + n + " preference pair" + (n === 1 ? "" : "s") + " and all that was learned from them";
  } catch (e) { $("status").textContent = e.status === 404 ? "nothing is stored for " + user : "error: " + e.message; }
  await loadProfile();
};
$("user").onchange = () => { tally = {personalized: 0, plain: 0, before: 0}; showTally(); loadProfile(); };
$("key").onchange = loadProfile;
loadProfile();
</script></body></html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(eng=Depends(engine)) -> str:
    return (PAGE.replace("__MODEL__", html.escape(eng.model_id))
            .replace("__MODEL_JSON__", json.dumps(eng.model_id).replace("</", "<\\/"))
            .replace("__AUTH_JSON__", json.dumps(bool(eng.settings.auth)))
            .replace("__KEYSTYLE__", "" if eng.settings.auth else 'title="not needed: this server runs without keys"'))


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    # as FastAPI's own /docs, with the files from this server (behind a proxy: under its root_path)
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                               swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png")


@router.get("/docs/assets/{name}", include_in_schema=False)
def docs_asset(name: str) -> FileResponse:
    if name not in DOCS_ASSETS:
        raise ApiError(404, f"no docs asset '{name}'", param="name", code="not_found")
    return FileResponse(resources.files("fastapi_swagger.resources") / name)
