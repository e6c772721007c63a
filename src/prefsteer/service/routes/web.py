"""GET /: a page to try the service by hand. A person types a prompt, gets two answers in random
order (the personalized one and a sampled plain one), clicks the one they prefer, and watches the
profile update: the attributes selected, with their gains as a small bar chart.

Server-rendered HTML with a little inline script that calls the same /v1 API as any client; no
build step, no external files. With keys required, the page asks for one (kept in the browser's
localStorage only).
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from prefsteer.service.auth import engine

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefsteer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.4rem} label{display:inline-block;margin:.2rem 1rem .2rem 0}
 textarea{width:100%;height:4.5rem;font:inherit} input{font:inherit}
 .pair{display:flex;gap:1rem;margin:1rem 0} .answer{flex:1;border:1px solid #ccc;border-radius:6px;padding:.7rem}
 .answer p{white-space:pre-wrap;min-height:3rem} button{font:inherit;cursor:pointer}
 .bar{display:inline-block;height:.7rem;background:#4a7;vertical-align:middle;margin-left:.4rem}
 .bar.neg{background:#c55} .entry{margin:.6rem 0;padding:.4rem .6rem;background:#f6f6f6;border-radius:4px}
 .muted{color:#777;font-size:.9em} #status{min-height:1.3rem}
</style></head><body>
<h1>prefsteer <span class="muted">serving <code>__MODEL__</code></span></h1>
<div>
 <label>User <input id="user" value="me" size="16"></label>
 <label __KEYSTYLE__>API key <input id="key" type="password" size="30" placeholder="ps-..."></label>
</div>
<textarea id="prompt" placeholder="Ask something...">Give me some advice for my first job interview.</textarea>
<div><button id="ask">Two answers</button> <span class="muted">click the one you prefer</span></div>
<div class="pair" id="pair" hidden>
 <div class="answer"><p id="a0"></p><button id="pick0">I prefer this one</button></div>
 <div class="answer"><p id="a1"></p><button id="pick1">I prefer this one</button></div>
</div>
<div id="status" class="muted"></div>
<h2>Profile</h2>
<div id="profile" class="muted">no feedback yet</div>
<script>
const $ = id => document.getElementById(id);
const MODEL = __MODEL_JSON__;
$("key").value = localStorage.getItem("prefsteer-key") || "";
$("user").value = localStorage.getItem("prefsteer-user") || $("user").value;
let shown = null;
function headers() {
  localStorage.setItem("prefsteer-key", $("key").value); localStorage.setItem("prefsteer-user", $("user").value);
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(), body: body ? JSON.stringify(body) : undefined});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.status);
  return data;
}
function chat(extra) {
  return api("POST", "/v1/chat/completions", Object.assign({model: MODEL, max_tokens: 80,
    messages: [{role: "user", content: $("prompt").value}]}, extra));
}
$("ask").onclick = async () => {
  $("status").textContent = "generating..."; $("pair").hidden = true;
  try {
    const user = $("user").value;
    const [mine, plain] = await Promise.all([chat({user}),
      chat({user, prefsteer: {method: "none"}, temperature: 1.0, seed: Math.floor(Math.random() * 1e9)})]);
    const answers = [{kind: mine.prefsteer.method, text: mine.choices[0].message.content, attrs: mine.prefsteer.attributes},
                     {kind: "plain, sampled", text: plain.choices[0].message.content, attrs: []}];
    if (Math.random() < 0.5) answers.reverse();
    shown = {prompt: $("prompt").value, answers};
    answers.forEach((a, i) => { $("a" + i).textContent = a.text; });
    $("pair").hidden = false; $("status").textContent = "";
  } catch (e) { $("status").textContent = "error: " + e.message; }
};
async function pick(i) {
  if (!shown) return;
  const chosen = shown.answers[i], rejected = shown.answers[1 - i];
  if (chosen.text.trim() === rejected.text.trim()) { $("status").textContent = "the two answers are the same: ask again"; return; }
  try {
    const user = $("user").value;
    const job = await api("POST", "/v1/users/" + encodeURIComponent(user) + "/feedback",
      {pairs: [{prompt: shown.prompt, chosen: chosen.text, rejected: rejected.text}]});
    $("status").textContent = "you preferred the " + chosen.kind + " answer; indexing...";
    shown = null; $("pair").hidden = true;
    for (let n = 0; n < 600; n++) {
      const j = await api("GET", "/v1/jobs/" + job.job_id);
      if (j.status === "done" || j.status === "failed") { $("status").textContent = "feedback " + j.status; break; }
      await new Promise(r => setTimeout(r, 500));
    }
    await loadProfile();
  } catch (e) { $("status").textContent = "error: " + e.message; }
}
$("pick0").onclick = () => pick(0); $("pick1").onclick = () => pick(1);
async function loadProfile() {
  let p;
  try { p = await api("GET", "/v1/users/" + encodeURIComponent($("user").value) + "/profile"); }
  catch (e) { $("profile").textContent = "no feedback yet"; return; }
  const box = $("profile"); box.textContent = ""; box.className = "";
  const head = document.createElement("p");
  head.textContent = p.pairs + " preference pair(s), " + p.entries.length + " memory entr" + (p.entries.length === 1 ? "y" : "ies");
  box.appendChild(head);
  const top = Math.max(1e-9, ...p.entries.flatMap(e => e.gains.map(Math.abs)));
  for (const e of p.entries) {
    const div = document.createElement("div"); div.className = "entry";
    const q = document.createElement("div"); q.className = "muted"; q.textContent = e.prompt; div.appendChild(q);
    e.attributes.forEach((a, k) => {
      const row = document.createElement("div"); row.className = "attr"; row.textContent = a + " " + (e.gains[k] >= 0 ? "+" : "") + e.gains[k].toFixed(3);
      const bar = document.createElement("span"); bar.className = "bar" + (e.gains[k] < 0 ? " neg" : "");
      bar.style.width = (6 * Math.abs(e.gains[k]) / top) + "rem"; row.appendChild(bar); div.appendChild(row);
    });
    box.appendChild(div);
  }
}
$("user").onchange = loadProfile;
loadProfile();
</script></body></html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(eng=Depends(engine)) -> str:
    import json

    return (PAGE.replace("__MODEL__", html.escape(eng.model_id))
            .replace("__MODEL_JSON__", json.dumps(eng.model_id).replace("</", "<\\/"))
            .replace("__KEYSTYLE__", "" if eng.settings.auth else 'title="not needed: this server runs without keys"'))
