// The exported model's page (index.html): a file written by `explainer export` run by onnxruntime-web's
// wasm backend. The model's metadata_props (read here from the ONNX bytes: onnxruntime-web does not
// expose them) give the preprocessing and the label names; the image is resized as the library resizes
// (Pillow's antialiased bicubic on float pixels, reimplemented below), normalised, and run once: the
// model's own output gives the top class and its probability, `saliency` (N, K, h, w) its map, drawn
// over the image after the same bicubic resize, in matplotlib's jet from the map's minimum to its maximum
// (as explainer.overlay draws an unsigned map).
//
// What a test (tests/test_web_page.py) or a user's script reads back: window.explained = {state, model,
// result}, with result = {topClass, label, probability, scores, saliency: {dims, data}, saliencyClass,
// input: {dims, data}}; <body data-state="loading|ready|running|done|error" data-top-class=...>.
"use strict";

const params = new URLSearchParams(location.search);
const ORT_BASE = withSlash(params.get("ort") || "node_modules/onnxruntime-web/dist/");
const explained = (window.explained = { state: "loading", model: null, result: null, error: null });
let session = null;
let shown = null; // {pixels: RGBA ImageData of the image, map: Float32Array at image size, lo, hi}

function withSlash(url) { return url.endsWith("/") ? url : url + "/"; }
const $ = (id) => document.getElementById(id);

function setState(state) {
  if (state === "loading") explained.model = null;
  explained.state = state;
  document.body.dataset.state = state;
}

function fail(error) {
  const message = error && error.message ? error.message : String(error);
  explained.error = message;
  $("error").textContent = message;
  $("error").style.display = "block";
  setState("error");
  console.error(error);
}

// ---- onnxruntime-web ------------------------------------------------------------------------------
function loadOrt() {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = ORT_BASE + "ort.min.js";
    script.onload = () => resolve(window.ort);
    script.onerror = () => reject(new Error(
      `onnxruntime-web did not load from ${script.src}. Install it next to this page ` +
      "(npm install onnxruntime-web) or give its dist/ folder as ?ort=URL."));
    document.head.appendChild(script);
  });
}

// ---- the few protobuf fields of an ONNX ModelProto the page needs --------------------------------
// wire format: varint keys (field << 3 | wire type); only varints and length-delimited fields are read,
// everything else (the weights included) is skipped by its length.
function* protoFields(bytes, start, end) {
  let pos = start;
  const varint = () => {
    let value = 0, mult = 1, byte;
    do {
      if (pos >= end) throw new Error("not an ONNX model (truncated protobuf)");
      byte = bytes[pos++];
      value += (byte & 0x7f) * mult;
      mult *= 128;
    } while (byte & 0x80);
    return value;
  };
  while (pos < end) {
    const key = varint(), field = Math.floor(key / 8), wire = key % 8;
    if (wire === 0) yield { field, value: varint() };
    else if (wire === 2) {
      const length = varint();
      if (pos + length > end) throw new Error("not an ONNX model (a field runs past the end)");
      yield { field, start: pos, end: pos + length };
      pos += length;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`not an ONNX model (protobuf wire type ${wire})`);
  }
}

const utf8 = new TextDecoder();
function protoString(bytes, f) { return utf8.decode(bytes.subarray(f.start, f.end)); }

function readModel(bytes) {
  const meta = {}, inputs = [];
  for (const f of protoFields(bytes, 0, bytes.length)) {
    if (f.field === 14 && f.start !== undefined) { // ModelProto.metadata_props: StringStringEntryProto
      let key = "", value = "";
      for (const g of protoFields(bytes, f.start, f.end)) {
        if (g.field === 1) key = protoString(bytes, g);
        if (g.field === 2) value = protoString(bytes, g);
      }
      meta[key] = value;
    } else if (f.field === 7 && f.start !== undefined) { // ModelProto.graph
      for (const g of protoFields(bytes, f.start, f.end)) {
        if (g.field === 11 && g.start !== undefined) inputs.push(readValueInfo(bytes, g));
      }
    }
  }
  return { meta, inputs };
}

function readValueInfo(bytes, f) { // ValueInfoProto: name 1, type 2 -> TypeProto.tensor_type 1
  const info = { name: "", elemType: 0, dims: [] };
  for (const g of protoFields(bytes, f.start, f.end)) {
    if (g.field === 1) info.name = protoString(bytes, g);
    if (g.field !== 2 || g.start === undefined) continue;
    for (const t of protoFields(bytes, g.start, g.end)) {
      if (t.field !== 1 || t.start === undefined) continue;
      for (const u of protoFields(bytes, t.start, t.end)) { // Tensor: elem_type 1, shape 2
        if (u.field === 1 && u.value !== undefined) info.elemType = u.value;
        if (u.field !== 2 || u.start === undefined) continue;
        for (const d of protoFields(bytes, u.start, u.end)) { // TensorShapeProto.dim: value 1, param 2
          if (d.field !== 1 || d.start === undefined) continue;
          let dim = null;
          for (const v of protoFields(bytes, d.start, d.end)) {
            if (v.field === 1 && v.value !== undefined) dim = v.value;
            if (v.field === 2 && v.start !== undefined) dim = protoString(bytes, v);
          }
          info.dims.push(dim);
        }
      }
    }
  }
  return info;
}

// ---- the model's contract -------------------------------------------------------------------------
const FLOAT = 1, UINT8 = 2;

function describe(bytes, ortSession) {
  const { meta, inputs } = readModel(bytes);
  const need = ["onnx_explainer.export.method", "onnx_explainer.preprocessing", "onnx_explainer.labels"];
  const missing = need.filter((k) => !(k in meta));
  if (missing.length) {
    throw new Error(`This is not a model written by explainer export (its metadata_props have no ${missing[0]}). ` +
      "Write one with: explainer export MODEL --method gradcam --out FILE");
  }
  if (!ortSession.outputNames.includes("saliency")) throw new Error("The model has no 'saliency' output.");
  const image = inputs.find((i) => i.name !== "target" && ortSession.inputNames.includes(i.name));
  if (!image || image.dims.length !== 4) throw new Error("The model's image input is not a 4-d tensor.");
  if (image.elemType !== FLOAT && image.elemType !== UINT8) {
    throw new Error(`The model's image input has ONNX element type ${image.elemType}; the page feeds float32 or uint8.`);
  }
  const d = image.dims;
  const isChannels = (v) => v === 1 || v === 3;
  // channels first unless only the last dimension looks like a channel count (the library's rule)
  const layout = isChannels(d[1]) || !isChannels(d[3]) ? "NCHW" : "NHWC";
  const [c, h, w] = layout === "NCHW" ? [d[1], d[2], d[3]] : [d[3], d[1], d[2]];
  const size = (v) => (typeof v === "number" && v > 0 ? v : 224); // a free height or width: 224
  const prep = JSON.parse(meta["onnx_explainer.preprocessing"]);
  return {
    input: image.name, dtype: image.elemType === UINT8 ? "uint8" : "float32", layout,
    channels: typeof c === "number" && c > 0 ? c : 3, height: size(h), width: size(w),
    hasTarget: ortSession.inputNames.includes("target"),
    output: ortSession.outputNames.find((n) => n !== "saliency" && n !== "saliency_class"),
    preprocessing: {
      mean: [].concat(prep.mean), std: [].concat(prep.std),
      scale: prep.scale ?? 1, channelOrder: prep.channel_order || "RGB",
    },
    labels: JSON.parse(meta["onnx_explainer.labels"]),
    method: meta["onnx_explainer.export.method"], layer: meta["onnx_explainer.export.layer"] || "",
    mapSize: meta["onnx_explainer.export.map_size"] || "", version: meta["onnx_explainer.version"] || "",
  };
}

// ---- Pillow's antialiased bicubic resize of float images (Resample.c), what the library uses ------
function bicubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function coefficients(inSize, outSize) {
  const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = 2 * filterscale;
  const bounds = new Int32Array(outSize), weights = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    const k = new Float64Array(xmax);
    let total = 0;
    for (let x = 0; x < xmax; x++) total += (k[x] = bicubic((x + xmin - center + 0.5) / filterscale));
    if (total !== 0) for (let x = 0; x < xmax; x++) k[x] /= total;
    bounds[xx] = xmin;
    weights.push(k);
  }
  return { bounds, weights };
}

// one plane (h x w, row-major Float32Array) -> (oh x ow): horizontal pass first, then vertical, each
// stored as float32 (Pillow's mode "F"); unchanged when the size is.
function resizePlane(src, h, w, oh, ow) {
  if (h === oh && w === ow) return src;
  const vert = coefficients(h, oh);
  let plane = src, first = 0;
  if (ow !== w) {
    const hor = coefficients(w, ow);
    first = vert.bounds[0];
    const last = vert.bounds[oh - 1] + vert.weights[oh - 1].length;
    plane = new Float32Array((last - first) * ow);
    for (let y = 0; y < last - first; y++) {
      const row = (y + first) * w;
      for (let xx = 0; xx < ow; xx++) {
        const k = hor.weights[xx], x0 = row + hor.bounds[xx];
        let ss = 0;
        for (let x = 0; x < k.length; x++) ss += src[x0 + x] * k[x];
        plane[y * ow + xx] = ss;
      }
    }
  }
  if (oh === h) return plane;
  const out = new Float32Array(oh * ow);
  for (let yy = 0; yy < oh; yy++) {
    const k = vert.weights[yy], y0 = vert.bounds[yy] - first;
    for (let xx = 0; xx < ow; xx++) {
      let ss = 0;
      for (let y = 0; y < k.length; y++) ss += plane[(y0 + y) * ow + xx] * k[y];
      out[yy * ow + xx] = ss;
    }
  }
  return out;
}

// ---- preprocessing: explainer's Classifier.prepare + to_model_input --------------------------------
function roundHalfEven(v) {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function preprocess(imageData, model) {
  const { width: W, height: H, data } = imageData;
  const { height: h, width: w, channels } = model;
  // RGB planes (alpha dropped, as the library does), resized and clipped to 0..255
  let planes = [0, 1, 2].map((c) => {
    const plane = new Float32Array(W * H);
    for (let i = 0; i < W * H; i++) plane[i] = data[4 * i + c];
    const resized = resizePlane(plane, H, W, h, w);
    if (resized !== plane) for (let i = 0; i < resized.length; i++) resized[i] = Math.min(255, Math.max(0, resized[i]));
    return resized;
  });
  if (channels === 1) { // ITU-R BT.601 gray, as match_channels
    const gray = new Float32Array(h * w), f = Math.fround;
    const [wr, wg, wb] = [f(0.299), f(0.587), f(0.114)];
    for (let i = 0; i < h * w; i++) gray[i] = f(f(f(planes[0][i] * wr) + f(planes[1][i] * wg)) + f(planes[2][i] * wb));
    planes = [gray];
  }
  const p = model.preprocessing;
  if (p.channelOrder === "BGR" && planes.length === 3) planes = planes.slice().reverse();
  const pick = (v, c) => (v.length === 3 ? v[c] : v[0]);
  const f = Math.fround, n = h * w, C = planes.length;
  const x = model.dtype === "uint8" ? new Uint8Array(C * n) : new Float32Array(C * n);
  for (let c = 0; c < C; c++) {
    const scale = f(p.scale), mean = f(pick(p.mean, c)), std = f(pick(p.std, c)), plane = planes[c];
    for (let i = 0; i < n; i++) {
      let v = f(f(f(plane[i] * scale) - mean) / std);
      if (model.dtype === "uint8") v = Math.min(255, Math.max(0, roundHalfEven(v)));
      x[model.layout === "NCHW" ? c * n + i : i * C + c] = v;
    }
  }
  const dims = model.layout === "NCHW" ? [1, C, h, w] : [1, h, w, C];
  return { dims, data: x };
}

// ---- running ----------------------------------------------------------------------------------------
function probabilities(row) { // the row as given when it is one already (the library's test), else softmax
  const isProbability = row.every((v) => v >= 0 && v <= 1 + 1e-6) && Math.abs(row.reduce((a, b) => a + b, 0) - 1) <= 1e-3;
  if (isProbability) return row;
  const top = Math.max(...row), e = row.map((v) => Math.exp(v - top)), total = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / total);
}

async function run(model, input) {
  const feeds = { [model.input]: new ort.Tensor(model.dtype, input.data, input.dims) };
  let target = 0n, out;
  for (let attempt = 0; attempt < 2; attempt++) { // --top-k 0 models take the class: run again for the top one
    if (model.hasTarget) feeds.target = new ort.Tensor("int64", BigInt64Array.from([target]), [1]);
    out = await session.run(feeds);
    if (!model.hasTarget) break;
    const best = argmax(Array.from(out[model.output].data));
    if (BigInt(best) === target) break;
    target = BigInt(best);
  }
  const scores = probabilities(Array.from(out[model.output].data, Number));
  const saliency = out.saliency;
  const saliencyClass = out.saliency_class ? Array.from(out.saliency_class.data, Number) : [Number(target)];
  const top = saliencyClass[0];
  return {
    topClass: top, label: model.labels[top] ?? String(top), probability: scores[top], scores,
    saliency: { dims: saliency.dims.slice(), data: Array.from(saliency.data) }, saliencyClass,
    input: { dims: input.dims, data: Array.from(input.data) },
  };
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

// ---- drawing: matplotlib's jet (its 256-entry table from the segment data, indexed as matplotlib does) --
const JET_SEGMENTS = [
  [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
  [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
  [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
];
function segment(points, t) {
  for (let i = 1; i < points.length; i++) {
    const [x0, y0] = points[i - 1], [x1, y1] = points[i];
    if (t <= x1) return y0 + ((t - x0) / (x1 - x0)) * (y1 - y0);
  }
  return points[points.length - 1][1];
}
const JET = Array.from({ length: 256 }, (_, i) => JET_SEGMENTS.map((points) => segment(points, i / 255)));
function jet(t) { return JET[Math.min(255, Math.max(0, Math.floor(t * 256)))]; }

function draw() {
  if (!shown) return;
  const { pixels, map, lo, hi } = shown;
  const alpha = Number($("opacity").value), span = hi - lo || 1;
  const canvas = $("overlay");
  canvas.width = pixels.width;
  canvas.height = pixels.height;
  const out = new ImageData(pixels.width, pixels.height);
  for (let i = 0; i < map.length; i++) {
    const colour = jet(Math.min(1, Math.max(0, (map[i] - lo) / span)));
    for (let c = 0; c < 3; c++) out.data[4 * i + c] = Math.round((1 - alpha) * pixels.data[4 * i + c] + alpha * 255 * colour[c]);
    out.data[4 * i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
}

async function decode(file) {
  // no colour management and no premultiplied alpha: the pixels as stored, as Pillow reads them
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height);
}

async function explainImage(file) {
  const model = explained.model;
  setState("running");
  explained.error = null;
  $("error").style.display = "none";
  let pixels;
  try {
    pixels = await decode(file);
  } catch (error) {
    throw new Error(`${file.name}: not an image this browser decodes (${error.message})`);
  }
  const input = preprocess(pixels, model);
  const result = await run(model, input);
  const [, , mh, mw] = result.saliency.dims;
  const first = Float32Array.from(result.saliency.data.slice(0, mh * mw));
  let lo = Infinity, hi = -Infinity;
  for (const v of first) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  shown = { pixels, map: resizePlane(first, mh, mw, pixels.height, pixels.width), lo, hi };
  draw();
  $("top").textContent = `${result.label} (class ${result.topClass}): probability ${result.probability.toFixed(4)}`;
  $("how").textContent = `${model.method} map of the top class at ${mh}×${mw}, resized to the image by Pillow's ` +
    "bicubic (as explainer.overlay), jet from its minimum to its maximum.";
  $("result").hidden = false;
  explained.result = result;
  document.body.dataset.topClass = String(result.topClass);
  setState("done");
}

async function openModel(bytes, name) {
  setState("loading");
  explained.error = null;
  explained.model = null;
  $("error").style.display = "none";
  $("image").disabled = true;
  $("model-status").textContent = `loading ${name}…`;
  const loaded = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  const model = describe(bytes, loaded);
  session = loaded;
  explained.model = model;
  const rows = [["method", model.method], ["feature layer", model.layer], ["map size", model.mapSize],
    ["input", `${model.input}: ${model.layout} ${model.dtype}, ${model.channels}×${model.height}×${model.width}`],
    ["preprocessing", JSON.stringify(model.preprocessing)], ["classes", String(model.labels.length)],
    ["written by", `onnx-explainer ${model.version}`]];
  const table = $("model-info");
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
    th.textContent = k;
    td.textContent = v;
    tr.append(th, td);
    return tr;
  }));
  table.hidden = false;
  $("model-status").textContent = `${name} loaded`;
  $("image").disabled = false;
  setState("ready");
}

async function main() {
  await loadOrt();
  ort.env.wasm.wasmPaths = new URL(ORT_BASE, location.href).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? 0 : 1; // threads need cross-origin isolation
  $("model").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) setState("loading"); // at once: a script waiting for the model sees the old one gone
    if (file) file.arrayBuffer().then((b) => openModel(new Uint8Array(b), file.name)).catch(fail);
  });
  $("image").addEventListener("change", (e) => {
    if (e.target.files[0]) explainImage(e.target.files[0]).catch(fail);
  });
  $("opacity").addEventListener("input", draw);
  const url = params.get("model");
  if (url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    await openModel(new Uint8Array(await response.arrayBuffer()), url.split("/").pop());
  } else {
    $("model-status").textContent = "choose a file written by explainer export";
    setState("ready");
  }
}

main().catch(fail);
