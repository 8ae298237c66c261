// The NVG demo page: fills the controls from /api/info, sends a request to /api/generate, polls /api/job/<id>
// for progress and shows the samples and the coarse-to-fine progression. window.nvgLast holds the last result.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let refDataUrl = null;
let shown = 0;

function setMessage(text) { $("message").textContent = text || ""; }

function setNotes(notes) {
  $("notes").replaceChildren(...(notes || []).map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    return li;
  }));
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function showPanels() {
  const m = mode();
  $("mask-panel").hidden = m !== "mask";
  $("ref-panel").hidden = m !== "transfer" && m !== "regenerate";
  $("stages-row").hidden = m !== "transfer";
  $("keep-row").hidden = m !== "regenerate";
  $("content-row").hidden = m !== "regenerate";
}

// ------------------------------------------------------------------------------------------- sampler settings
const PAIRS = ["content_cfg", "structure_cfg", "top_p"];
const SINGLES = ["top_k", "temperature", "structure_steps"];

function resetSampler() {
  const d = info.defaults;
  for (const k of PAIRS) { $(k + "0").value = d[k][0]; $(k + "1").value = d[k][1]; }
  for (const k of SINGLES) $(k).value = d[k];
  $("gumbel_split").checked = d.gumbel_split;
  if ("structure_solver" in d) $("structure_solver").value = d.structure_solver;
}

function samplerSettings() {
  const out = {};
  for (const k of PAIRS) out[k] = [Number($(k + "0").value), Number($(k + "1").value)];
  for (const k of SINGLES) out[k] = Number($(k).value);
  out.gumbel_split = $("gumbel_split").checked;
  if (info.solvers.length) out.structure_solver = $("structure_solver").value;
  return out;
}

// ------------------------------------------------------------------------------------------- the mask canvas
const canvas = $("mask-canvas");
const ctx = canvas.getContext("2d");
let drawing = false;
let last = null;

function clearMask() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function invertMask() {
  const img = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < img.data.length; i += 4) {
    for (let c = 0; c < 3; c++) img.data[i + c] = 255 - img.data[i + c];
  }
  ctx.putImageData(img, 0, 0);
}

function point(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
}

function stroke(from, to) {
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
}

canvas.addEventListener("pointerdown", (e) => {
  drawing = true;
  last = point(e);
  stroke(last, last);
  canvas.setPointerCapture?.(e.pointerId);
});
canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const p = point(e);
  stroke(last, p);
  last = p;
});
for (const ev of ["pointerup", "pointercancel", "pointerleave"]) {
  canvas.addEventListener(ev, () => { drawing = false; });
}

// ------------------------------------------------------------------------------------------- reference upload
$("ref-file").addEventListener("change", () => {
  refDataUrl = null;
  setMessage("");
  const f = $("ref-file").files[0];
  $("ref-preview").hidden = true;
  if (!f) return;
  if (f.size > info.max_bytes) {
    setMessage(`reference image: the file is larger than ${info.max_bytes / 1048576} MB`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    refDataUrl = reader.result;
    $("ref-preview").src = refDataUrl;
    $("ref-preview").hidden = false;
  };
  reader.onerror = () => setMessage("reference image: the file could not be read");
  reader.readAsDataURL(f);
});
$("ref-preview").addEventListener("error", () => { $("ref-preview").hidden = true; });

// ------------------------------------------------------------------------------------------- results
function img(src, cls, title) {
  const el = document.createElement("img");
  el.src = src;
  if (cls) el.className = cls;
  if (title) el.title = title;
  return el;
}

function showProgression(k) {
  const res = window.nvgLast;
  shown = k;
  document.querySelectorAll(".sample").forEach((el, i) => el.classList.toggle("shown", i === k));
  $("prog-title").textContent = `(sample ${k + 1})`;
  $("progression").replaceChildren(...res.progression[k].map((s) => {
    const box = document.createElement("div");
    box.className = "stage";
    const cap = document.createElement("span");
    cap.textContent = `stage ${s.stage + 1}: ${2 ** s.stage} cluster${s.stage ? "s" : ""}`;
    box.append(cap, img(s.structure, "structure", `structure map of stage ${s.stage + 1}`),
      img(s.image, "image", `image after stage ${s.stage + 1}`));
    return box;
  }));
}

function showResult(res) {
  window.nvgLast = res;
  $("samples").replaceChildren(...res.images.map((src, b) => {
    const box = document.createElement("div");
    box.className = "sample";
    box.append(img(src, "image", `sample ${b + 1}`), img(res.structures[b], "structure", "stage-1 structure"));
    box.addEventListener("click", () => showProgression(b));
    return box;
  }));
  showProgression(0);
}

// ------------------------------------------------------------------------------------------- generate
function request() {
  const body = {
    class: Number($("class").value), mode: mode(), seed: Number($("seed").value), n: Number($("n").value),
    sampler: samplerSettings(),
  };
  if (body.mode === "mask") body.mask = canvas.toDataURL("image/png");
  if (body.mode === "transfer" || body.mode === "regenerate") {
    if (!refDataUrl) throw new Error("reference image: upload an image first");
    body.image = refDataUrl;
    body.stages = Number($("stages").value);
    body.keep_stages = Number($("keep-stages").value);
    body.keep_content = $("keep-content").checked;
  }
  return body;
}

function progress(done, total, text) {
  $("progress").hidden = false;
  $("progress").max = total;
  $("progress").value = done;
  $("progress-text").textContent = text;
}

async function poll(job) {
  for (;;) {
    const r = await fetch(`/api/job/${job}`);
    const st = await r.json();
    if (!r.ok) throw new Error(st.error || `HTTP ${r.status}`);
    progress(st.done, st.total, st.text);
    setNotes(st.notes);
    if (st.state === "done") return st;
    if (st.state === "error") throw new Error(st.error);
    await new Promise((ok) => setTimeout(ok, 200));
  }
}

async function generate() {
  setMessage("");
  setNotes([]);
  document.body.dataset.state = "running";
  $("generate").disabled = true;
  try {
    const body = request();
    progress(0, 1, "sending");
    const r = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let answer;
    try { answer = await r.json(); } catch { answer = { error: `the server answered HTTP ${r.status}` }; }
    if (!r.ok) throw new Error(answer.error || `HTTP ${r.status}`);
    const res = await poll(answer.job);
    showResult(res);
    $("progress-text").textContent = `done in ${res.seconds} s`;
    document.body.dataset.state = "done";
  } catch (e) {
    setMessage(e.message || String(e));
    $("progress").hidden = true;
    $("progress-text").textContent = "";
    document.body.dataset.state = "error";
  } finally {
    $("generate").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------- start
async function start() {
  clearMask();
  try {
    info = await (await fetch("/api/info")).json();
  } catch (e) {
    setMessage("the server does not answer: is `python -m nvg.demo` running?");
    return;
  }
  $("class").replaceChildren(...info.classes.map((name, i) => {
    const o = document.createElement("option");
    o.value = i;
    o.textContent = name === String(i) ? name : `${i}: ${name}`;
    return o;
  }));
  const S = info.num_stages;
  $("num-stages").textContent = S;
  $("stages").max = S;
  $("keep-stages").max = S - 1;
  $("n").max = info.max_samples;
  $("structure_solver").replaceChildren(...info.solvers.map((name) => {
    const o = document.createElement("option");
    o.value = o.textContent = name;
    return o;
  }));
  resetSampler();
  document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", showPanels));
  $("clear-mask").addEventListener("click", clearMask);
  $("invert-mask").addEventListener("click", invertMask);
  $("reset-sampler").addEventListener("click", resetSampler);
  $("generate").addEventListener("click", generate);
  showPanels();
  document.body.dataset.state = "ready";
}

start();
