// The reader's page: it knows its token (from the address), the next position and nothing else.
"use strict";
const base = window.location.pathname.replace(/\/+$/, "");
const form = document.getElementById("form");
const submit = document.getElementById("submit");
let state = null;

function chosen(name) {
  const el = form.querySelector(`input[name="${name}"]:checked`);
  return el ? el.value : null;
}

function ready() {
  return chosen("answer") && chosen("confidence") && (!state.clinical || chosen("uptake"));
}

function update() { submit.disabled = !ready(); }

async function load() {
  const r = await fetch(`${base}/state`, {cache: "no-store"});
  if (!r.ok) { document.body.textContent = await r.text(); return; }
  state = await r.json();
  document.getElementById("title").textContent = state.title;
  document.title = state.title;
  if (state.done) {
    document.getElementById("task").hidden = true;
    document.getElementById("done").hidden = false;
    document.getElementById("progress").textContent = `${state.total} of ${state.total} answered`;
    return;
  }
  document.getElementById("uptake").hidden = !state.clinical;
  document.getElementById("progress").textContent = `Item ${state.position} of ${state.total}`;
  form.reset();
  update();
  const img = document.getElementById("image");
  img.src = `${base}/image/${state.position}`;
  await img.decode().catch(() => {});
  document.getElementById("task").hidden = false;
}

async function send(event) {
  event.preventDefault();
  if (!ready()) return;
  submit.disabled = true;
  const body = {position: state.position, answer: chosen("answer"), confidence: Number(chosen("confidence"))};
  if (state.clinical) body.uptake = chosen("uptake");
  const r = await fetch(`${base}/answer`, {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)});
  document.getElementById("error").textContent = r.ok ? "" : await r.text();
  await load();
}

function pick(name, value) {
  const el = form.querySelector(`input[name="${name}"][value="${value}"]`);
  if (el && !(name === "uptake" && !state.clinical)) { el.checked = true; update(); }
}

document.addEventListener("keydown", (e) => {
  if (!state || state.done || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  if (k === "r") pick("answer", "real");
  else if (k === "s") pick("answer", "synthetic");
  else if ("12345".includes(k) && k.length === 1) pick("confidence", k);
  else if (k === "y") pick("uptake", "yes");
  else if (k === "n") pick("uptake", "no");
  else if (k === "enter") { form.requestSubmit(); }
  else return;
  e.preventDefault();
});
form.addEventListener("change", update);
form.addEventListener("submit", send);
load();
