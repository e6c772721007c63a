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
 #status{min-height:1.4rem}
 .summary{display:grid;grid-template-columns:max-content 1fr;gap:.25rem .8rem;align-items:center;margin:.4rem 0 1rem}
 .track{background:var(--bg2);border-radius:3px;height:.8rem;position:relative}
 .bar{display:block;height:.8rem;border-radius:3px;background:var(--pos)} .bar.neg{background:var(--neg)}
 .entry{border:1px solid var(--line);border-radius:8px;padding:.6rem .9rem;margin:.6rem 0}
 .entry .prompt{font-weight:600;margin-bottom:.3rem}
 .attr{display:grid;grid-template-columns:10rem 1fr 4.5rem;gap:.6rem;align-items:center;font-size:.92em}
 .attr .gain{text-align:right;font-variant-numeric:tabular-nums;color:var(--muted)}
 @media (max-width:40rem){.pair{grid-template-columns:1fr}}
</style></head><body>
<header><h1>prefsteer</h1><span class="muted">personalized answers from your preferences &middot; serving <code>__MODEL__</code></span></header>
<div class="row">
 <label>User id<input id="user" value="me" size="18"></label>
 <label __KEYSTYLE__>API key<input id="key" type="password" size="34" placeholder="ps-..."></label>
</div>
<textarea id="prompt" placeholder="Ask something...">Give me some advice for my first job interview.</textarea>
<div class="actions"><button id="ask" class="primary">Get two answers</button>
 <span class="muted">one is personalized for you, one is plain; click the one you prefer</span></div>
<div class="pair" id="pair" hidden>
 <div class="answer"><h3>Answer 1</h3><p id="a0"></p><button id="pick0">I prefer answer 1</button></div>
 <div class="answer"><h3>Answer 2</h3><p id="a1"></p><button id="pick1">I prefer answer 2</button></div>
</div>
<div id="status" class="muted"></div>
<h2>Your profile</h2>
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
  if (!r.ok) { const e = new Error((data.error && data.error.message) || r.status); e.status = r.status; throw e; }
  return data;
}
function chat(extra) {
  return api("POST", "/v1/chat/completions", Object.assign({model: MODEL, max_tokens: 80,
    messages: [{role: "user", content: $("prompt").value}]}, extra));
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
$("ask").onclick = async () => {
  $("status").textContent = "generating..."; $("pair").hidden = true; $("ask").disabled = true;
  try {
    const user = $("user").value;
    const [mine, plain] = await Promise.all([chat({user}),
      chat({user, prefsteer: {method: "none"}, temperature: 1.0, seed: Math.floor(Math.random() * 1e9)})]);
    const answers = [{kind: mine.prefsteer.method === "none" ? "plain (no profile yet)" : "personalized (" + mine.prefsteer.method + ")",
                      text: mine.choices[0].message.content},
                     {kind: "plain, sampled", text: plain.choices[0].message.content}];
    if (Math.random() < 0.5) answers.reverse();
    shown = {prompt: $("prompt").value, answers};
    answers.forEach((a, i) => { $("a" + i).textContent = a.text; });
    $("pair").hidden = false; $("status").textContent = "";
  } catch (e) { $("status").textContent = "error: " + e.message; }
  $("ask").disabled = false;
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
      if (j.status === "done" || j.status === "failed") {
        $("status").textContent = "feedback " + j.status + (j.error ? ": " + j.error : ""); break; }
      await new Promise(r => setTimeout(r, 500));
    }
    await loadProfile();
  } catch (e) { $("status").textContent = "error: " + e.message; }
}
$("pick0").onclick = () => pick(0); $("pick1").onclick = () => pick(1);
function barRow(parent, name, gain, top) {
  const row = el("div", "attr"); row.appendChild(el("span", "name", name));
  const track = el("span", "track"), bar = el("span", "bar" + (gain < 0 ? " neg" : ""));
  bar.style.width = (100 * Math.abs(gain) / top).toFixed(1) + "%"; track.appendChild(bar); row.appendChild(track);
  row.appendChild(el("span", "gain", (gain >= 0 ? "+" : "") + gain.toFixed(3))); parent.appendChild(row);
}
async function loadProfile() {
  let p;
  const box = $("profile");
  try { p = await api("GET", "/v1/users/" + encodeURIComponent($("user").value) + "/profile"); }
  catch (e) { box.className = "muted"; box.textContent = e.status === 404 ? "no feedback yet" : "error: " + e.message; return; }
  box.textContent = ""; box.className = "";
  box.appendChild(el("p", "muted", p.pairs + " preference pair" + (p.pairs === 1 ? "" : "s") + ", " + p.entries.length +
    " memory entr" + (p.entries.length === 1 ? "y" : "ies") + (p.pending_jobs.length ? ", " + p.pending_jobs.length + " being indexed" : "")));
  // the attributes across entries: how often selected, and their summed gain (the evidence)
  const total = {};
  for (const e of p.entries) e.attributes.forEach((a, k) => { total[a] = (total[a] || 0) + e.gains[k]; });
  const names = Object.keys(total).sort((a, b) => total[b] - total[a]);
  if (names.length) {
    box.appendChild(el("div", "muted", "attributes selected for you, by summed gain (nats)"));
    const sum = el("div", "summary"), top = Math.max(1e-9, ...names.map(n => Math.abs(total[n])));
    for (const n of names) {
      sum.appendChild(el("span", "", n)); const track = el("span", "track"), bar = el("span", "bar" + (total[n] < 0 ? " neg" : ""));
      bar.style.width = (100 * Math.abs(total[n]) / top).toFixed(1) + "%"; track.appendChild(bar); sum.appendChild(track);
    }
    box.appendChild(sum);
  }
  const top = Math.max(1e-9, ...p.entries.flatMap(e => e.gains.map(Math.abs)));
  for (const e of p.entries) {
    const div = el("div", "entry"); div.appendChild(el("div", "prompt", e.prompt));
    e.attributes.forEach((a, k) => barRow(div, a, e.gains[k], top));
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
