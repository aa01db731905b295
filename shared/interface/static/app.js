// The page talks to the server only through its HTTP API: GET /limits, POST /generate, POST /trajectory.
// Inpainting sends the source and the mask as PNG data URLs (inpaint_image, inpaint_mask); a preset mask
// is drawn on a canvas of the model's size, white (255) where to draw and black (0) where to keep.
// A 422 names the field it is about ({"detail": [{"loc": ["body", field], "msg"}]}); its message is shown
// next to that field. A 503 is the server's full queue: shown as "busy, retry".
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_MS = 80;     // trajectory playback: one frame every 80 ms
let playTimer = null;
let frames = [];
let imageShape = null;   // the model's [C, H, W], from /limits
const inpaint = { source: null, mask: null };  // PNG data URLs, or null

function png(b64) { return "data:image/png;base64," + b64; }

function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  $("status").textContent = "";
  $("status").className = "";
}

function showErrors(body) {
  const detail = Array.isArray(body.detail) ? body.detail : [{ loc: [], msg: String(body.detail || body.message) }];
  for (const item of detail) {
    const field = (item.loc || []).filter((part) => part !== "body")[0];
    const slot = (field && $("error-" + field)) || $("error-general");
    slot.textContent = (slot.textContent ? slot.textContent + "; " : "") + item.msg;
  }
}

// Number fields: an empty box means "the server's default"; anything else goes as typed, so the
// server's validation (not the browser's) decides and its message is what the user sees.
function numberField(id) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : text;
}

function requestBody(withN) {
  const body = {
    prompt: $("prompt").value,
    guidance_scale: Number($("guidance").value),
    sampler: $("sampler").value,
    steps: numberField("steps"),
    seed: numberField("seed"),
  };
  if (withN) body.n = numberField("n");
  const rescale = numberField("rescale");
  if (rescale !== undefined) body.guidance_rescale = rescale;
  const lo = numberField("interval-lo"), hi = numberField("interval-hi");
  if (lo !== undefined || hi !== undefined) body.guidance_interval = [lo, hi];
  if (inpaint.source || inpaint.mask) {
    body.inpaint_image = inpaint.source;
    body.inpaint_mask = inpaint.mask;
    body.jump_length = numberField("jump-length");
    body.resamplings = numberField("resamplings");
  }
  return body;
}

// --- inpainting inputs

function setInpaint(which, dataUrl) {
  inpaint[which] = dataUrl;
  const preview = $("inpaint-" + which + "-preview");
  if (dataUrl) preview.src = dataUrl; else preview.removeAttribute("src");
}

function readFile(input, which) {
  const file = input.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInpaint(which, reader.result);
  reader.readAsDataURL(file);
}

// A preset mask at the model's size: white (fill) in the region, black (keep) elsewhere, exact 0/255 pixels.
function presetMask(kind) {
  if (!kind || !imageShape) return null;
  const [, h, w] = imageShape;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  ctx.fillStyle = "#fff";
  const half = { left: [0, 0, w / 2, h], right: [w / 2, 0, w / 2, h], top: [0, 0, w, h / 2],
                 bottom: [0, h / 2, w, h / 2], centre: [w / 4, h / 4, w / 2, h / 2] }[kind];
  ctx.fillRect(...half.map(Math.round));
  return canvas.toDataURL("image/png");
}

function useFirstImage() {
  const first = document.querySelector("#images img");
  if (!first) {
    $("error-inpaint_image").textContent = "generate an image first";
    return;
  }
  $("error-inpaint_image").textContent = "";
  setInpaint("source", first.src);
}

function clearInpaint() {
  setInpaint("source", null);
  setInpaint("mask", null);
  $("inpaint-mask-preset").value = "";
  $("inpaint-source-file").value = "";
  $("inpaint-mask-file").value = "";
}

async function call(path, body) {
  clearErrors();
  $("status").textContent = "sampling…";
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: { "content-type": "application/json" },
                                   body: JSON.stringify(body) });
  } catch (err) {
    $("status").textContent = "";
    $("error-general").textContent = "the server cannot be reached (" + err + ")";
    return null;
  }
  let data = {};
  try { data = await response.json(); } catch (err) { data = { detail: response.statusText }; }
  if (response.ok) {
    $("status").textContent = "";
    return data;
  }
  if (response.status === 503) {
    const wait = response.headers.get("Retry-After") || "a few";
    $("status").textContent = "busy, retry in " + wait + " s";
    $("status").className = "busy";
  } else if (response.status === 422) {
    $("status").textContent = "the request was refused:";
    showErrors(data);
  } else {
    $("status").textContent = "error " + response.status;
    $("error-general").textContent = data.message || data.detail || response.statusText;
  }
  return null;
}

function figure(b64, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = png(b64);
  img.alt = caption;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

async function generate(event) {
  if (event) event.preventDefault();
  const data = await call("/generate", requestBody(true));
  if (!data) return;
  const gallery = $("images");
  gallery.replaceChildren(...data.images.map((b64, i) => figure(b64, "seed " + data.parameters.seeds[i])));
  $("status").textContent = data.images.length + " images in " + data.timing.seconds.toFixed(2) + " s, " +
    data.parameters.nfe + " NFE each" + (data.parameters.inpaint ? " (inpainted)" : "");
}

function showFrame(i) {
  const f = frames[i];
  $("traj-xt").src = png(f.x_t);
  $("traj-x0").src = png(f.x0);
  $("traj-slider").value = i;
  $("traj-label").textContent = "step " + (f.step + 1) + " · t = " + f.t + " · ᾱ_t = " + f.alpha_bar.toFixed(4);
}

function play() {
  clearInterval(playTimer);
  let i = Number($("traj-slider").value);
  if (i >= frames.length - 1) i = 0;
  playTimer = setInterval(() => {
    showFrame(i);
    i += 1;
    if (i >= frames.length) clearInterval(playTimer);
  }, FRAME_MS);
}

async function trajectory() {
  const data = await call("/trajectory", requestBody(false));
  if (!data) return;
  frames = data.frames;
  $("trajectory").dataset.frames = String(frames.length);
  $("traj-slider").max = String(frames.length - 1);
  $("traj-slider").disabled = false;
  $("traj-play").disabled = false;
  $("status").textContent = frames.length + " frames of " + data.timing.steps + " steps";
  play();
}

async function sweep() {
  const ws = $("sweep-ws").value.split(",").map((w) => w.trim()).filter((w) => w !== "");
  const row = $("sweep");
  row.replaceChildren();
  for (const w of ws) {
    const body = requestBody(false);
    body.guidance_scale = Number.isFinite(Number(w)) ? Number(w) : w;
    body.n = 1;
    const data = await call("/generate", body);
    if (!data) return;
    row.append(figure(data.images[0], "w = " + w));
  }
  $("status").textContent = "seed " + numberField("seed") + " at w = " + ws.join(", ");
}

async function loadLimits() {
  const response = await fetch("/limits");
  const limits = await response.json();
  const select = $("sampler");
  for (const [name, steps] of Object.entries(limits.samplers)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name + " (default " + steps + " steps)";
    select.append(option);
  }
  select.value = "ddim";
  imageShape = limits.image_shape;
  $("guidance").max = String(limits.max_guidance);
  $("steps").value = String(Math.min(Number($("steps").value), limits.max_steps));
  $("model-info").textContent = (limits.dataset || "model") + " · " + limits.num_classes + " classes · T = " +
    limits.num_timesteps;
  $("limits").textContent = "limits: steps 1–" + limits.max_steps + ", n 1–" + limits.max_n + ", n × NFE ≤ " +
    limits.max_image_steps + " (NFE: network calls per image), 0 ≤ w ≤ " + limits.max_guidance + "; " + limits.max_pending +
    " requests at a time";
  const buttons = $("class-buttons");
  limits.class_names.forEach((name, k) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = String(k);
    b.title = name;
    b.addEventListener("click", () => { $("prompt").value = name; });
    buttons.append(b);
  });
  document.body.dataset.ready = "true";
}

$("guidance").addEventListener("input", () => { $("guidance-value").textContent = $("guidance").value; });
$("controls").addEventListener("submit", generate);
$("trajectory-button").addEventListener("click", trajectory);
$("sweep-button").addEventListener("click", sweep);
$("traj-play").addEventListener("click", play);
$("inpaint-source-file").addEventListener("change", () => readFile($("inpaint-source-file"), "source"));
$("inpaint-mask-file").addEventListener("change", () => {
  $("inpaint-mask-preset").value = "";
  readFile($("inpaint-mask-file"), "mask");
});
$("inpaint-mask-preset").addEventListener("change", () => setInpaint("mask", presetMask($("inpaint-mask-preset").value)));
$("inpaint-use-first").addEventListener("click", useFirstImage);
$("inpaint-clear").addEventListener("click", clearInpaint);
$("traj-slider").addEventListener("input", () => { clearInterval(playTimer); showFrame(Number($("traj-slider").value)); });
loadLimits().catch((err) => { $("error-general").textContent = "cannot read /limits (" + err + ")"; });
