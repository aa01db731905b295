// The page talks to the server only through its HTTP API: GET /limits, POST /generate, POST /trajectory.
// A 422 names the field it is about ({"detail": [{"loc": ["body", field], "msg"}]}); its message is shown
// next to that field. A 503 is the server's full queue: shown as "busy, retry".
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_MS = 80;     // trajectory playback: one frame every 80 ms
let playTimer = null;
let frames = [];

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
  return body;
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
  $("status").textContent = data.images.length + " images in " + data.timing.seconds.toFixed(2) + " s";
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
  $("guidance").max = String(limits.max_guidance);
  $("steps").value = String(Math.min(Number($("steps").value), limits.max_steps));
  $("model-info").textContent = (limits.dataset || "model") + " · " + limits.num_classes + " classes · T = " +
    limits.num_timesteps;
  $("limits").textContent = "limits: steps 1–" + limits.max_steps + ", n 1–" + limits.max_n + ", n × steps ≤ " +
    limits.max_image_steps + ", 0 ≤ w ≤ " + limits.max_guidance + "; " + limits.max_pending +
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
$("traj-slider").addEventListener("input", () => { clearInterval(playTimer); showFrame(Number($("traj-slider").value)); });
loadLimits().catch((err) => { $("error-general").textContent = "cannot read /limits (" + err + ")"; });
