// onnx-explainer's page: pick or drop an image, see the top-5 classes, click one, pick methods, and see
// each method's map over the image (side by side, as MATLAB's plotMaps), with an opacity slider, a
// colour bar and downloads. Plain JavaScript against the service's /v1 API; nothing fetched elsewhere.
"use strict";

const state = {
  file: null, imageUrl: null, selected: null, predictions: [], classes: 5,
  token: sessionStorage.getItem("explainer-token") || "",
};
const $ = (id) => document.getElementById(id);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super((e.type ? e.type + ": " : "") + (e.message || "HTTP " + status));
    this.status = status;
  }
}

async function api(path, options) {
  options = options || {};
  const response = await fetch(path, Object.assign({}, options, { headers: headers(options.headers) }));
  if (response.status === 401) {
    $("token-box").hidden = false;
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

// model, methods ----------------------------------------------------------------------------------
async function loadModel() {
  try {
    const model = await api("v1/model");
    state.classes = model.classes.count;
    $("model").textContent = `${model.name}: ${model.input.height}×${model.input.width}, ${model.classes.count} classes, ` +
      `preprocessing ${model.preprocessing.name}`;
    const methods = (await api("v1/methods")).methods;
    const box = $("methods");
    box.innerHTML = "<legend>Methods</legend>";
    methods.forEach((m, i) => {
      const label = document.createElement("label");
      label.title = `${m.answers}\nCost: ${m.cost}`;
      label.innerHTML = `<input type="checkbox" name="method" value="${m.name}"${i < 2 ? " checked" : ""}> ${m.name} <span class="kind">(${m.kind})</span>`;
      box.appendChild(label);
    });
    showError(null);
  } catch (err) {
    $("model").textContent = "";
    showError(err);
  }
}

// image, classes ----------------------------------------------------------------------------------
async function useFile(file) {
  if (!file) return;
  state.file = file;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.src = state.imageUrl;
  preview.hidden = false;
  $("maps").innerHTML = "";
  $("explain").disabled = true;
  $("predictions").tBodies[0].innerHTML = "";
  $("classes-hint").textContent = "classifying…";
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(Math.min(5, state.classes)));
  try {
    const result = await api("v1/classify", { method: "POST", body: form });
    state.predictions = result.predictions;
    renderPredictions();
    select(result.predictions[0].index);
    $("classes-hint").textContent = `${result.image.width}×${result.image.height} image; click a class to explain it.`;
    $("explain").disabled = false;
    showError(null);
  } catch (err) {
    $("classes-hint").textContent = "";
    showError(err);
  }
}

function renderPredictions() {
  const body = $("predictions").tBodies[0];
  body.innerHTML = "";
  const top = state.predictions.length ? state.predictions[0].score : 1;
  for (const p of state.predictions) {
    const row = body.insertRow();
    row.dataset.index = p.index;
    row.dataset.label = p.label;
    row.dataset.score = String(p.score);
    row.insertCell().textContent = p.label;
    const score = row.insertCell();
    score.className = "score";
    score.textContent = p.score.toFixed(4);
    const bar = row.insertCell();
    bar.innerHTML = `<div class="bar" style="width:${Math.max(1, Math.round(120 * p.score / top))}px"></div>`;
    row.addEventListener("click", () => select(p.index));
  }
}

function select(index) {
  state.selected = index;
  for (const row of $("predictions").tBodies[0].rows) {
    row.classList.toggle("selected", Number(row.dataset.index) === index);
  }
}

// explanations ------------------------------------------------------------------------------------
function requestId() {
  return "page-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 10);
}

async function explainAll() {
  const methods = Array.from(document.querySelectorAll('input[name="method"]:checked')).map((i) => i.value);
  if (!state.file || state.selected === null || !methods.length) {
    showError(methods.length ? "pick an image first" : "pick at least one method");
    return;
  }
  showError(null);
  $("explain").disabled = true;
  const label = state.predictions.find((p) => p.index === state.selected);
  const maps = $("maps");
  maps.innerHTML = "";
  maps.appendChild(imagePanel(label));
  const panels = methods.map((m) => { const p = methodPanel(m, label); maps.appendChild(p); return p; });
  const started = performance.now();
  let done = 0;
  for (let i = 0; i < methods.length; i++) {  // one at a time: each panel fills as soon as its method ends
    $("status").textContent = `${done}/${methods.length} methods done`;
    await explainOne(methods[i], panels[i]);
    done++;
  }
  $("status").textContent = `${methods.length} methods in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  $("explain").disabled = false;
}

function imagePanel(label) {
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.innerHTML = `<h3>image</h3><div class="stack"><img alt="image"></div><div class="meta"></div>`;
  panel.querySelector("img").src = state.imageUrl;
  panel.querySelector(".meta").textContent = `${label.label} (${label.score.toFixed(4)})`;
  return panel;
}

function methodPanel(method, label) {
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.dataset.method = method;
  panel.dataset.state = "waiting";
  panel.innerHTML = `<h3></h3><div class="waiting"><span class="spinner"></span><span class="elapsed">waiting…</span></div>`;
  panel.querySelector("h3").textContent = `${method}: ${label.label}`;
  return panel;
}

async function explainOne(method, panel) {
  const id = requestId();
  const started = performance.now();
  const elapsed = panel.querySelector(".elapsed");
  let progress = "";
  const tick = setInterval(() => {
    elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s${progress}`;
  }, 100);
  const poll = setInterval(async () => {
    try {
      const p = await api("v1/progress/" + id);
      progress = p.total ? ` · ${p.stage} ${p.done}/${p.total}` : (p.stage ? ` · ${p.stage}` : "");
    } catch (err) { /* not started yet, or ended */ }
  }, 500);
  const form = new FormData();
  form.append("image", state.file);
  form.append("methods", method);
  form.append("labels", String(state.selected));
  form.append("outputs", "maps,heatmaps");
  try {
    const result = await api("v1/explain", { method: "POST", body: form, headers: { "X-Request-Id": id } });
    await showMap(panel, result, result.maps[0]);
  } catch (err) {
    panel.dataset.state = "error";
    panel.querySelector(".waiting").innerHTML = `<span class="error"></span>`;
    panel.querySelector(".error").textContent = err.message;
  } finally {
    clearInterval(tick);
    clearInterval(poll);
  }
}

let colourbarUrl = null;
async function colourbar() {
  if (!colourbarUrl) colourbarUrl = URL.createObjectURL(await api("v1/colourbar"));
  return colourbarUrl;
}

async function showMap(panel, result, map) {
  const opacity = $("opacity").value;
  const bar = await colourbar();
  panel.innerHTML = `<h3></h3>
    <div class="figure">
      <div class="stack"><img class="base" alt="image"><img class="heatmap" alt="map"></div>
      <div class="colourbar"><img alt="colour bar"><div class="ticks"><span class="max"></span><span class="min"></span></div></div>
    </div>
    <div class="meta"></div>
    <div class="buttons"><button type="button" class="small png">PNG</button><button type="button" class="small npy">map .npy</button></div>`;
  panel.querySelector("h3").textContent = `${map.method}: ${map.label.label}`;
  panel.querySelector("img.base").src = state.imageUrl;
  const heat = panel.querySelector("img.heatmap");
  heat.style.opacity = opacity;
  const loaded = new Promise((resolve) => { heat.onload = resolve; heat.onerror = resolve; });
  heat.src = "data:image/png;base64," + map.heatmap_png;
  panel.querySelector(".colourbar img").src = bar;
  panel.querySelector(".max").textContent = map.max.toPrecision(3);
  panel.querySelector(".min").textContent = map.min.toPrecision(3);
  const seconds = result.timings.methods[map.method];
  panel.querySelector(".meta").textContent = `${seconds.toFixed(2)} s, waited ${result.timings.queue_s.toFixed(2)} s`;
  panel.querySelector(".png").addEventListener("click", () => downloadPng(panel, map));
  panel.querySelector(".npy").addEventListener("click", () => downloadNpy(map));
  await loaded;
  panel.dataset.state = "shown";
}

function setOpacity() {
  const value = $("opacity").value;
  $("opacity-value").textContent = Number(value).toFixed(2);
  for (const img of document.querySelectorAll("img.heatmap")) img.style.opacity = value;
}

// downloads ---------------------------------------------------------------------------------------
function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function downloadPng(panel, map) {
  // the image with the map over it at the slider's opacity, at the image's own size
  const base = panel.querySelector("img.base"), heat = panel.querySelector("img.heatmap");
  const canvas = document.createElement("canvas");
  canvas.width = map.shape[1];
  canvas.height = map.shape[0];
  const ctx = canvas.getContext("2d");
  ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = Number($("opacity").value);
  ctx.drawImage(heat, 0, 0, canvas.width, canvas.height);
  canvas.toBlob((blob) => save(blob, `${map.method}_${map.label.index}.png`), "image/png");
}

function downloadNpy(map) {
  // the float16 map as a NumPy .npy file (format 1.0): np.load gives the (H, W) array
  const bytes = Uint8Array.from(atob(map.data), (c) => c.charCodeAt(0));
  let header = `{'descr': '<f2', 'fortran_order': False, 'shape': (${map.shape[0]}, ${map.shape[1]}), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";
  const head = new Uint8Array(10 + header.length);
  head.set([0x93, 78, 85, 77, 80, 89, 1, 0, header.length & 255, header.length >> 8]);
  for (let i = 0; i < header.length; i++) head[10 + i] = header.charCodeAt(i);
  save(new Blob([head, bytes], { type: "application/octet-stream" }), `${map.method}_${map.label.index}.npy`);
}

// wiring ------------------------------------------------------------------------------------------
function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  $("explain").addEventListener("click", explainAll);
  $("opacity").addEventListener("input", setOpacity);
  $("token").value = state.token;
  $("token-save").addEventListener("click", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("explainer-token", state.token);
    $("token-box").hidden = true;
    loadModel();
    if (state.file) useFile(state.file);
  });
  loadModel();
}

wire();
