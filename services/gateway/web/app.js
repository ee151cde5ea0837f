// fluxpipe's image page: plain JavaScript against the gateway's own API, no build step.
// The token lives in localStorage under "fluxpipe.token" (or Open WebUI's "token" when the
// page is served beside Open WebUI); every call sends it as a bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: "", models: [], model: null, uploads: [], task: null, cursor: null, page: 1 };
const TERMINAL = new Set(["SUCCESS", "FAILED", "CANCELLED"]);
const STEPS = { PENDING: 1, IN_QUEUE: 2, IN_PROGRESS: 3, SUCCESS: 4, FAILED: 4, CANCELLED: 4 };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const message = (body && (body.message || (body.error && body.error.message) || body.detail)) || text || response.statusText;
    throw new ApiError(response.status, typeof message === "string" ? message : JSON.stringify(message));
  }
  return body;
}

function showError(error) {
  const text = error instanceof ApiError ? `${error.status}: ${error.message}` : String(error && error.message || error || "");
  $("error").textContent = text;
}

// --- sign in ----------------------------------------------------------------------------

function initialToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    history.replaceState(null, "", location.pathname + location.search);
    return fromHash;
  }
  return localStorage.getItem("fluxpipe.token") || localStorage.getItem("token") || "";
}

async function signIn(token) {
  state.token = token.trim();
  showError("");
  if (!state.token) { $("whoami").textContent = "Not signed in."; return; }
  try {
    await api("/api/flux/history?limit=1");
    localStorage.setItem("fluxpipe.token", state.token);
    $("whoami").textContent = "Signed in.";
    $("signout").hidden = false;
    $("token").value = "";
    await loadGallery(true);
  } catch (error) {
    state.token = "";
    $("whoami").textContent = "Not signed in.";
    showError(error);
  }
}

// --- models and their controls -------------------------------------------------------

function normaliseModel(raw) {
  const mode = String(raw.mode || raw.kind || "text_to_image").replace(/-/g, "_").replace(/ /g, "_");
  const schema = raw.parameters || raw.schema || raw.parameter_schema || {};
  let params = [];
  if (Array.isArray(schema)) {
    params = schema;
  } else if (schema.properties) {
    params = Object.entries(schema.properties).map(([name, spec]) => ({ name, ...spec }));
  } else {
    params = Object.entries(schema).map(([name, spec]) => ({ name, ...spec }));
  }
  const images = raw.input_images || {};
  const props = (schema && schema.properties) || {};
  return {
    imageField: raw.image_field || (mode.startsWith("multi") ? "image_urls" : "image_url"),
    takesPrompt: !schema.properties || "prompt" in props,
    id: raw.id,
    name: raw.name || raw.display_name || raw.id,
    mode,
    minImages: raw.min_images ?? images.min ?? (mode === "text_to_image" ? 0 : mode.startsWith("multi") ? 2 : 1),
    maxImages: raw.max_images ?? images.max ?? (mode === "text_to_image" ? 0 : mode.startsWith("multi") ? 10 : 1),
    params: params.filter((p) => !["prompt", "image_url", "image_urls", "model"].includes(p.name)),
  };
}

async function loadModels() {
  const body = await api("/api/flux/models");
  const list = Array.isArray(body) ? body : body.models || body.items || body.data || [];
  state.models = list.map(normaliseModel);
  renderModelChoices();
}

function wantsImages() {
  return document.querySelector('input[name="mode"]:checked').value === "image";
}

function renderModelChoices() {
  const select = $("model");
  select.replaceChildren();
  const groups = new Map();
  for (const model of state.models) {
    if (wantsImages() === (model.minImages === 0)) continue;
    const label = model.mode.replace(/_/g, " ");
    if (!groups.has(label)) {
      const group = document.createElement("optgroup");
      group.label = label;
      groups.set(label, group);
      select.append(group);
    }
    const option = new Option(`${model.name} (${model.id})`, model.id);
    groups.get(label).append(option);
  }
  selectModel(select.value);
}

function selectModel(id) {
  state.model = state.models.find((m) => m.id === id) || null;
  const model = state.model;
  $("inputs").hidden = !model || model.minImages === 0;
  $("model-help").textContent = model ? `${model.mode.replace(/_/g, " ")}` : "";
  $("prompt-field").hidden = Boolean(model && !model.takesPrompt);
  if (model && model.minImages > 0) {
    $("files-help").textContent = model.minImages === model.maxImages
      ? `Exactly ${model.minImages} image${model.minImages > 1 ? "s" : ""}.`
      : `From ${model.minImages} to ${model.maxImages} images.`;
    $("files").multiple = model.maxImages > 1;
  }
  renderParams();
}

function typeOf(spec) {
  if (spec.enum) return "enum";
  if (spec.type) return Array.isArray(spec.type) ? spec.type.find((t) => t !== "null") : spec.type;
  const any = spec.anyOf && spec.anyOf.find((s) => s.type !== "null");
  if (any) { Object.assign(spec, { ...any, ...spec }); return any.enum ? "enum" : any.type; }
  return "string";
}

function renderParams() {
  const box = $("params");
  box.replaceChildren();
  if (!state.model) return;
  for (const spec of state.model.params) {
    const kind = typeOf(spec);
    const id = `param-${spec.name}`;
    const wrap = document.createElement("div");
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = spec.title || spec.name.replace(/_/g, " ");
    let input;
    if (kind === "enum") {
      input = document.createElement("select");
      if (spec.default === undefined || spec.default === null) input.append(new Option("(model default)", ""));
      for (const value of spec.enum) input.append(new Option(String(value), String(value)));
    } else if (kind === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(spec.default);
    } else {
      input = document.createElement("input");
      input.type = kind === "integer" || kind === "number" ? "number" : "text";
      if (kind === "integer") input.step = "1";
      if (kind === "number") input.step = "any";
      const min = spec.minimum ?? spec.exclusiveMinimum;
      const max = spec.maximum ?? spec.exclusiveMaximum;
      if (min !== undefined) input.min = min;
      if (max !== undefined) input.max = max;
      input.placeholder = spec.default === undefined || spec.default === null ? "model default" : "";
    }
    input.id = id;
    input.name = spec.name;
    input.dataset.kind = kind;
    if (spec.default !== undefined && spec.default !== null && kind !== "boolean") input.value = String(spec.default);
    if (spec.description) input.title = spec.description;
    wrap.append(label, input);
    box.append(wrap);
  }
}

function paramValues() {
  const out = {};
  for (const input of $("params").querySelectorAll("input, select")) {
    const kind = input.dataset.kind;
    if (kind === "boolean") { out[input.name] = input.checked; continue; }
    if (input.value === "") continue;
    if (kind === "integer") out[input.name] = parseInt(input.value, 10);
    else if (kind === "number") out[input.name] = parseFloat(input.value);
    else if (kind === "enum" && input.value !== "" && !Number.isNaN(Number(input.value)) && typeof findEnum(input.name)[0] === "number") out[input.name] = Number(input.value);
    else out[input.name] = input.value;
  }
  return out;
}

function findEnum(name) {
  const spec = state.model.params.find((p) => p.name === name);
  return (spec && spec.enum) || [];
}

// --- uploads ----------------------------------------------------------------------------

async function uploadFiles(files) {
  showError("");
  state.uploads = [];
  $("previews").replaceChildren();
  for (const file of files) {
    const form = new FormData();
    form.append("file", file);
    try {
      const stored = await api("/api/flux/upload-image", { method: "POST", body: form });
      state.uploads.push(stored.url);
      const item = document.createElement("li");
      const img = document.createElement("img");
      img.src = stored.url;
      img.alt = `Uploaded ${file.name}`;
      item.append(img);
      $("previews").append(item);
    } catch (error) {
      showError(error);
      return;
    }
  }
}

// --- submitting and following a task ----------------------------------------------------

async function submit(event) {
  event.preventDefault();
  showError("");
  const model = state.model;
  if (!model) { showError("Choose a model."); return; }
  const body = { model: model.id, ...paramValues() };
  const prompt = $("prompt").value.trim();
  if (prompt && model.takesPrompt) body.prompt = prompt;
  let path = "/api/flux/text-to-image";
  if (model.minImages > 0) {
    path = "/api/flux/image-to-image";
    if (state.uploads.length < model.minImages) {
      showError(`This model needs ${model.minImages === 1 ? "an input image" : `${model.minImages} or more input images`}: upload first.`);
      return;
    }
    if (model.imageField === "image_urls") body.image_urls = state.uploads.slice(0, model.maxImages);
    else body.image_url = state.uploads[0];
  }
  $("submit").disabled = true;
  try {
    const accepted = await api(path, { method: "POST", json: body });
    follow(accepted.task_id);
  } catch (error) {
    showError(error);
  } finally {
    $("submit").disabled = false;
  }
}

function render(task) {
  state.task = task;
  $("current").hidden = false;
  $("task-id").textContent = task.id;
  $("task-status").textContent = task.status;
  $("task-progress").value = STEPS[task.status] || 0;
  $("cancel").hidden = TERMINAL.has(task.status);
  $("retry").hidden = !TERMINAL.has(task.status) || task.status === "SUCCESS";
  const result = $("task-result");
  result.replaceChildren();
  if (task.status === "FAILED" || task.status === "CANCELLED") {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = task.error_message || task.status.toLowerCase();
    result.append(p);
  }
  const images = (task.images && task.images.length ? task.images : task.image_url ? [{ url: task.image_url }] : []);
  if (task.status === "SUCCESS") {
    for (const [i, image] of images.entries()) {
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = `Result ${i + 1} of task ${task.id}: ${task.prompt || ""}`;
      result.append(img);
    }
  }
}

function logLine(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("task-log").append(li);
}

async function refresh(taskId) {
  const task = await api(`/api/flux/task/${encodeURIComponent(taskId)}`);
  render(task);
  return task;
}

let following = null;

async function follow(taskId) {
  if (following) following.abort();
  const controller = new AbortController();
  following = controller;
  $("task-log").replaceChildren();
  await refresh(taskId).catch(showError);
  try {
    await streamEvents(taskId, controller.signal);
  } catch (error) {
    if (controller.signal.aborted) return;
    logLine("live feed unavailable; polling");
  }
  // Either the feed ended with the story, or polling takes over until the task is done
  // and its copy is stored.
  while (!controller.signal.aborted) {
    const task = await refresh(taskId).catch(() => null);
    if (task && TERMINAL.has(task.status) && (task.status !== "SUCCESS" || task.cloud_image_url || task.storage_error)) break;
    await new Promise((r) => setTimeout(r, 700));
  }
  if (!controller.signal.aborted) loadGallery(true);
}

async function streamEvents(taskId, signal) {
  // EventSource cannot send a bearer token, so the server-sent events are read with fetch.
  const response = await fetch(`/api/flux/task/${encodeURIComponent(taskId)}/events`, {
    headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" },
    signal,
  });
  if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      const type = (block.split("\n").find((l) => l.startsWith("event:")) || "").slice(6).trim();
      if (!data) continue;
      let event;
      try { event = JSON.parse(data); } catch { continue; }
      logLine(event.type || type || "event");
      await refresh(taskId).catch(() => null);
    }
  }
}

async function cancelTask() {
  if (!state.task) return;
  try {
    await api(`/api/flux/task/${encodeURIComponent(state.task.id)}/cancel`, { method: "POST" });
    await refresh(state.task.id);
  } catch (error) { showError(error); }
}

async function retryTask() {
  if (!state.task) return;
  try {
    const accepted = await api(`/api/flux/task/${encodeURIComponent(state.task.id)}/retry`, { method: "POST" });
    follow(accepted.task_id || accepted.id);
  } catch (error) { showError(error); }
}

// --- the gallery ------------------------------------------------------------------------

async function loadGallery(reset) {
  if (!state.token) return;
  if (reset) { state.cursor = null; state.page = 1; $("items").replaceChildren(); }
  const form = new FormData($("filters"));
  const query = new URLSearchParams({ limit: "24" });
  for (const [key, value] of form.entries()) if (value) query.set(key, value);
  if (state.cursor) query.set("cursor", state.cursor);
  let body;
  try {
    body = await api(`/api/flux/unified-history?${query}`);
  } catch (error) {
    showError(error);
    return;
  }
  const items = body.items || body.data || [];
  for (const item of items) $("items").append(card(item));
  state.cursor = body.next_cursor || null;
  $("more").hidden = !state.cursor;
  if (!items.length && reset) {
    const li = document.createElement("li");
    li.textContent = "Nothing yet.";
    $("items").append(li);
  }
}

function card(item) {
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.src = item.image_url || item.url;
  img.alt = item.prompt || "generated image";
  img.loading = "lazy";
  const tag = document.createElement("span");
  tag.className = "tag";
  tag.textContent = item.tag || item.source;
  const prompt = document.createElement("p");
  prompt.textContent = item.prompt || "";
  const when = document.createElement("time");
  when.dateTime = item.created_at;
  when.textContent = new Date(item.created_at).toLocaleString();
  li.append(img, tag, prompt, when);
  return li;
}

// --- wiring -----------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", async () => {
  $("signin").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value); });
  $("signout").addEventListener("click", () => {
    localStorage.removeItem("fluxpipe.token");
    state.token = "";
    $("signout").hidden = true;
    $("whoami").textContent = "Not signed in.";
    $("items").replaceChildren();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", renderModelChoices);
  $("model").addEventListener("change", (e) => selectModel(e.target.value));
  $("files").addEventListener("change", (e) => uploadFiles([...e.target.files]));
  $("job").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelTask);
  $("retry").addEventListener("click", retryTask);
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); loadGallery(true); });
  $("more").addEventListener("click", () => loadGallery(false));
  try { await loadModels(); } catch (error) { showError(error); }
  await signIn(initialToken());
});
