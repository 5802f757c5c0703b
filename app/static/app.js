// DiffuseExpand's page: plain JavaScript, no build step, talks to this origin's /v1 API only.
//
// Every request carries the API key (when the service asks for one) in the Authorization header, so
// live progress is read with fetch() streaming rather than EventSource (which cannot send headers),
// and pair images are fetched and shown as blob: URLs.
"use strict";

const KEY_STORE = "diffexp.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const PAGE_SIZE = 24; // pairs per page of the preview grid
const MAX_STREAMS = 3; // browsers allow 6 connections per host: leave room for images and actions
const POLL_MS = 1000;
const LIST_REFRESH_MS = 10000;

const $ = (id) => document.getElementById(id);

let apiKey = sessionStorage.getItem(KEY_STORE);
let models = new Map();
const jobs = new Map(); // id -> last JobPublic seen
const watchers = new Map(); // id -> AbortController of its progress stream or poll
let openStreams = 0;
let eventsRoute = true; // false once /events answered 404/405: the service has no SSE, poll instead
let listTimer = null;
const grid = { jobId: null, offset: 0, total: 0, urls: [], loading: null, lastKept: -1, reloadTimer: null };

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
  return headers;
}

async function problemOf(resp) {
  const type = resp.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      return await resp.json();
    } catch (_) {
      /* not JSON after all */
    }
  }
  return { title: resp.statusText || `HTTP ${resp.status}`, status: resp.status };
}

// fetch with the key; a non-2xx answer throws an ApiError carrying the problem details
async function request(path, { method = "GET", body, signal, headers } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (body !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    const err = new ApiError(resp.status, await problemOf(resp));
    if (resp.status === 401) askForKey(err);
    throw err;
  }
  return resp;
}

async function api(path, options) {
  const resp = await request(path, options);
  return resp.status === 204 ? null : resp.json();
}

// ---------------------------------------------------------------- errors

function showError(err) {
  if (err && err.name === "AbortError") return;
  const box = $("error");
  const list = $("error-list");
  list.replaceChildren();
  if (err instanceof ApiError) {
    $("error-title").textContent = `${err.problem.title || "Error"}${err.status ? ` (${err.status})` : ""}:`;
    $("error-detail").textContent = err.problem.detail || "";
    for (const e of err.problem.errors || []) {
      const li = document.createElement("li");
      const where = e.pointer ? e.pointer.replace(/^#\/?/, "") : e.parameter || e.header || "";
      li.textContent = where ? `${where}: ${e.detail}` : e.detail;
      list.append(li);
    }
  } else {
    $("error-title").textContent = "Network error:";
    $("error-detail").textContent = err && err.message ? err.message : String(err);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// ---------------------------------------------------------------- API key

function askForKey(err) {
  const wrong = Boolean(apiKey);
  setKey(null);
  stopEverything();
  $("app").hidden = true;
  $("key-section").hidden = false;
  $("key-reason").textContent = wrong
    ? "That key was refused; enter a valid API key."
    : "This service needs an API key.";
  if (wrong && err) showError(err);
  $("api-key").focus();
}

function setKey(key) {
  apiKey = key;
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("forget-key").hidden = !key;
  $("key-status-text").textContent = key ? "Using an API key (this tab only)." : "";
}

function stopEverything() {
  for (const ctl of watchers.values()) ctl.abort();
  watchers.clear();
  clearInterval(listTimer);
  listTimer = null;
  jobs.clear();
  $("jobs").replaceChildren();
  closeGrid();
}

// ---------------------------------------------------------------- models and the job form

const PARAMS = ["eta", "tau", "steps", "w_cf", "w_cg"];

function defaultsOf(model) {
  const s = model.sampling_defaults;
  return { eta: model.eta_default, tau: s.tau, steps: s.steps, w_cf: s.w_cf, w_cg: s.w_cg };
}

async function loadModels() {
  const answer = await api("/v1/models");
  models = new Map(answer.data.map((m) => [m.name, m]));
  const select = $("f-model");
  select.replaceChildren();
  for (const m of answer.data) {
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = `${m.name} (${m.resolution}×${m.resolution})`;
    select.append(opt);
  }
  if (models.has(answer.default)) select.value = answer.default;
  fillDefaults();
}

function fillDefaults() {
  const model = models.get($("f-model").value);
  if (!model) return;
  const d = defaultsOf(model);
  for (const name of PARAMS) {
    const input = $(`f-${name}`);
    input.value = d[name];
    input.dataset.default = String(d[name]);
  }
  $("defaults-hint").textContent =
    `Defaults of ${model.name}: η ${d.eta}, τ ${d.tau}, ${d.steps} steps, ` +
    `w_cf ${d.w_cf}, w_cg ${d.w_cg}. Only changed values are sent.`;
  fillMaskChoices(model);
}

// real and mixed masks, and the clean-up, need the model's training masks (masks.npz)
function fillMaskChoices(model) {
  const has = Boolean(model.training_masks);
  const select = $("f-mask_source");
  for (const opt of select.options) opt.disabled = !has && opt.value !== "generated";
  if (!has) select.value = "generated";
  $("f-clean_masks").disabled = !has;
  if (!has) $("f-clean_masks").checked = false;
  $("masks-hint").hidden = has;
  $("masks-hint").textContent = has
    ? ""
    : `${model.name} carries no training masks: only generated masks, not cleaned.`;
  showRealShare();
}

function showRealShare() {
  $("real-share-field").hidden = $("f-mask_source").value !== "mixed";
}

function jobBody() {
  const body = { model: $("f-model").value, count: Number($("f-count").value) };
  for (const name of PARAMS) {
    const input = $(`f-${name}`);
    // a value left at the model's default is not sent: the service applies its defaults itself
    // (a τ sent explicitly would also drop a bundle's default guidance scale)
    if (input.value !== "" && Number(input.value) !== Number(input.dataset.default)) {
      body[name] = Number(input.value);
    }
  }
  if ($("f-seed").value !== "") body.seed = Number($("f-seed").value);
  const source = $("f-mask_source").value;
  if (source !== "generated") body.mask_source = source;
  if (source === "mixed" && $("f-real_share").value !== "") {
    body.real_share = Number($("f-real_share").value);
  }
  if ($("f-clean_masks").checked) body.clean_masks = true;
  return body;
}

async function submitJob(event) {
  event.preventDefault();
  clearError();
  const button = $("submit-job");
  button.disabled = true;
  try {
    const job = await api("/v1/jobs", { method: "POST", body: jobBody() });
    renderJob(job, true);
    watch(job.id);
    openGrid(job.id);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- the job list

async function loadJobs() {
  const answer = await api("/v1/jobs?limit=20");
  const seen = new Set();
  answer.data.forEach((job, i) => {
    seen.add(job.id);
    renderJob(job, false, i);
    if (!TERMINAL.has(job.status)) watch(job.id);
  });
  for (const id of [...jobs.keys()]) if (!seen.has(id)) removeJob(id);
  $("jobs-empty").hidden = answer.count > 0;
  const more = $("jobs-more");
  more.hidden = answer.count <= answer.data.length;
  more.textContent = `The newest ${answer.data.length} of ${answer.count} jobs.`;
}

function refreshJobs() {
  loadJobs().catch(showError);
}

function fmtSeconds(s) {
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// The progress bar: kept of target pairs. While a running job has kept nothing yet (its first batch
// is being sampled: masks, images, then the filter) it has no value, which a browser draws as a busy,
// indeterminate bar instead of one stuck at 0.
function barState(job) {
  const p = job.progress;
  const max = Math.max(1, p.target);
  if (job.status === "running" && p.kept === 0) return { max, value: null };
  return { max, value: Math.min(p.kept, p.target) };
}

function progressText(job) {
  const p = job.progress;
  // kept counts every pair any shard kept, which may pass the target: the result holds the target
  const parts = [
    `${Math.min(p.kept, p.target)} of ${p.target} pairs`,
    `generated ${p.generated}`,
    `kept ${p.kept}`,
    `discarded ${p.discarded}`,
  ];
  if (p.pairs_per_second) parts.push(`${p.pairs_per_second.toFixed(2)} pairs/s`);
  if (p.eta_seconds != null && !TERMINAL.has(job.status)) parts.push(`about ${fmtSeconds(p.eta_seconds)} left`);
  if (p.phase && !TERMINAL.has(job.status)) parts.push(`phase: ${p.phase}`);
  return parts.join(" · ");
}

function button(label, action, id) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.id = id;
  b.setAttribute("aria-label", `${label}: job ${id.slice(0, 8)}`);
  return b;
}

function jobItem(job) {
  const li = document.createElement("li");
  li.className = "job";
  li.id = `job-${job.id}`;
  li.dataset.id = job.id;
  const head = document.createElement("div");
  head.className = "job-head";
  const id = document.createElement("code");
  id.className = "job-id";
  id.textContent = job.id.slice(0, 8);
  id.title = job.id;
  const status = document.createElement("span");
  status.className = "status";
  const what = document.createElement("span");
  what.className = "job-what";
  head.append(id, status, what);
  const bar = document.createElement("progress");
  bar.setAttribute("aria-label", `Kept pairs of job ${job.id.slice(0, 8)}`);
  const counts = document.createElement("p");
  counts.className = "counts";
  const error = document.createElement("p");
  error.className = "job-error";
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(
    button("Show pairs", "pairs", job.id),
    button("Download zip", "download", job.id),
    button("Cancel", "cancel", job.id),
    button("Delete", "delete", job.id),
  );
  li.append(head, bar, counts, error, actions);
  return li;
}

// create or update a job's entry in place (focus and scroll stay where they are)
function renderJob(job, first = false, position = null) {
  const before = jobs.get(job.id);
  jobs.set(job.id, job);
  const list = $("jobs");
  let li = $(`job-${job.id}`);
  if (!li) {
    li = jobItem(job);
    if (first) list.prepend(li);
    else if (position !== null && list.children[position]) list.insertBefore(li, list.children[position]);
    else list.append(li);
  }
  $("jobs-empty").hidden = true;
  li.dataset.status = job.status;
  const status = li.querySelector(".status");
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  const params = job.params;
  li.querySelector(".job-what").textContent = `${params.model} · ${params.count} pairs · η ${params.eta}`;
  const bar = li.querySelector("progress");
  const state = barState(job);
  bar.max = state.max;
  if (state.value === null) bar.removeAttribute("value");
  else bar.value = state.value;
  li.querySelector(".counts").textContent = progressText(job);
  const error = li.querySelector(".job-error");
  error.textContent = job.error ? `Error: ${job.error}` : "";
  error.hidden = !job.error;
  const done = TERMINAL.has(job.status);
  li.querySelector('[data-action="cancel"]').hidden = done;
  const download = li.querySelector('[data-action="download"]');
  download.hidden = job.status === "queued" || (job.status === "running" && job.progress.kept === 0);
  download.textContent = job.status === "succeeded" ? "Download zip" : "Download kept so far";
  if (grid.jobId === job.id) onSelectedJobChanged(before, job);
}

function removeJob(id) {
  const ctl = watchers.get(id);
  if (ctl) ctl.abort();
  watchers.delete(id);
  jobs.delete(id);
  const li = $(`job-${id}`);
  if (li) li.remove();
  if (grid.jobId === id) closeGrid();
  $("jobs-empty").hidden = jobs.size > 0;
}

async function onJobAction(event) {
  const b = event.target.closest("button[data-action]");
  if (!b) return;
  const id = b.dataset.id;
  clearError();
  try {
    if (b.dataset.action === "pairs") {
      openGrid(id);
    } else if (b.dataset.action === "cancel") {
      b.disabled = true;
      renderJob(await api(`/v1/jobs/${id}/cancel`, { method: "POST" }));
    } else if (b.dataset.action === "delete") {
      if (!window.confirm(`Delete job ${id.slice(0, 8)} and all its pairs?`)) return;
      b.disabled = true;
      await api(`/v1/jobs/${id}`, { method: "DELETE" });
      removeJob(id);
    } else if (b.dataset.action === "download") {
      await download(id, b);
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) removeJob(id);
    showError(err);
  } finally {
    b.disabled = false;
  }
}

// The zip is fetched with the key, then saved from a blob: URL (a plain link could not send the key).
async function download(id, b) {
  const job = jobs.get(id);
  const partial = job && job.status !== "succeeded" ? "?partial=true" : "";
  const label = b.textContent;
  b.disabled = true;
  b.textContent = "Downloading…";
  try {
    const resp = await request(`/v1/jobs/${id}/pairs.zip${partial}`);
    const url = URL.createObjectURL(await resp.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = `${id}${partial ? "-partial" : ""}.zip`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } finally {
    b.textContent = label;
  }
}

// ---------------------------------------------------------------- live progress

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      reject(new DOMException("aborted", "AbortError"));
    });
  });
}

function watch(id) {
  if (watchers.has(id)) return;
  const ctl = new AbortController();
  watchers.set(id, ctl);
  (async () => {
    let done = false;
    if (eventsRoute && openStreams < MAX_STREAMS) {
      openStreams += 1;
      try {
        done = await stream(id, ctl.signal);
      } catch (err) {
        if (err.name === "AbortError" || (err instanceof ApiError && err.status === 401)) return;
        done = false; // a stream that fails falls back to polling
      } finally {
        openStreams -= 1;
      }
    }
    if (!done) {
      if (!eventsRoute) setLiveMode("polling");
      await poll(id, ctl.signal);
    }
  })()
    .catch((err) => {
      if (err.name !== "AbortError" && !(err instanceof ApiError && err.status === 401)) showError(err);
    })
    .finally(() => {
      if (watchers.get(id) === ctl) watchers.delete(id);
    });
}

// Server-Sent Events over fetch(): resolves true once a terminal event came, false when the service has
// no events route or the stream keeps breaking (the caller polls instead). Resumes with Last-Event-ID.
async function stream(id, signal) {
  let lastId = null;
  for (let failures = 0; failures < 3; ) {
    const headers = { Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let resp;
    try {
      resp = await request(`/v1/jobs/${id}/events`, { headers, signal });
    } catch (err) {
      if (err instanceof ApiError && (err.status === 404 || err.status === 405)) {
        if (err.status === 405 || err.problem.detail === "Not Found" || !err.problem.detail) eventsRoute = false;
        return false;
      }
      throw err;
    }
    if (!(resp.headers.get("Content-Type") || "").startsWith("text/event-stream") || !resp.body) {
      eventsRoute = false;
      return false;
    }
    setLiveMode("events");
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = { data: [], type: "message", id: null };
    let got = false;
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (signal.aborted) throw err;
        break; // the connection broke: resume
      }
      if (chunk.done) break;
      buffer += chunk.value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (event.id !== null) lastId = event.id;
          if (event.data.length) {
            got = true;
            if (handleEvent(id, event.type, event.data.join("\n"))) {
              reader.cancel().catch(() => {});
              return true;
            }
          }
          event = { data: [], type: "message", id: null };
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: the server's keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") event.data.push(value);
        else if (field === "event") event.type = value;
        else if (field === "id") event.id = value;
      }
    }
    failures = got ? 0 : failures + 1;
    await sleep(500, signal);
  }
  return false;
}

function setLiveMode(mode) {
  $("live-mode").dataset.mode = mode;
  $("live-mode").textContent =
    mode === "events" ? "Live progress: event stream." : "Live progress: polling every second.";
}

function handleEvent(id, type, data) {
  let job;
  try {
    job = JSON.parse(data);
  } catch (_) {
    return false;
  }
  if (job && job.id === id) renderJob(job);
  return TERMINAL.has(type) || (job && TERMINAL.has(job.status));
}

async function poll(id, signal) {
  for (;;) {
    let job;
    try {
      job = await api(`/v1/jobs/${id}`, { signal });
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        removeJob(id);
        return;
      }
      if (err instanceof ApiError && err.status !== 503 && err.status !== 429) throw err;
      await sleep(POLL_MS * 3, signal); // the service is busy or down for a moment: keep watching
      continue;
    }
    renderJob(job);
    if (TERMINAL.has(job.status)) return;
    await sleep(POLL_MS, signal);
  }
}

// ---------------------------------------------------------------- the preview grid

function openGrid(id) {
  if (grid.jobId !== id) {
    grid.jobId = id;
    grid.offset = 0;
    grid.lastKept = -1;
  }
  $("pairs-section").hidden = false;
  $("pairs-heading").textContent = `Pairs of job ${id.slice(0, 8)}`;
  loadGrid();
}

function closeGrid() {
  grid.jobId = null;
  for (const url of grid.urls) URL.revokeObjectURL(url);
  grid.urls = [];
  $("grid").replaceChildren();
  $("pairs-section").hidden = true;
}

// a running job keeps adding pairs: reload the page of the grid when it may show more
function onSelectedJobChanged(before, job) {
  const kept = job.progress.kept;
  const finished = TERMINAL.has(job.status) && !(before && TERMINAL.has(before.status));
  if (!finished && kept === grid.lastKept) return;
  grid.lastKept = kept;
  if (grid.reloadTimer) return;
  grid.reloadTimer = setTimeout(() => {
    grid.reloadTimer = null;
    if (grid.jobId === job.id) loadGrid();
  }, finished ? 0 : 1500);
}

async function loadGrid() {
  const id = grid.jobId;
  if (!id) return;
  const ctl = new AbortController();
  if (grid.loading) grid.loading.abort();
  grid.loading = ctl;
  try {
    const page = await api(`/v1/jobs/${id}/pairs?offset=${grid.offset}&limit=${PAGE_SIZE}`, { signal: ctl.signal });
    if (grid.jobId !== id) return;
    renderGrid(page, ctl.signal);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) removeJob(id);
    showError(err);
  }
}

function renderGrid(page, signal) {
  grid.total = page.count;
  const first = page.count ? page.offset + 1 : 0;
  const last = page.offset + page.data.length;
  const which = page.final ? "the final result" : "kept so far";
  $("pairs-summary").textContent = page.count
    ? `Pairs ${first}–${last} of ${page.count} (${which}). Red: the mask's outline.`
    : "No pairs kept yet.";
  $("pairs-page").textContent = page.count ? `${first}–${last} of ${page.count}` : "";
  $("pairs-prev").disabled = page.offset === 0;
  $("pairs-next").disabled = last >= page.count;
  const old = grid.urls;
  grid.urls = [];
  const figures = page.data.map((pair) => {
    const fig = document.createElement("figure");
    fig.className = "pair";
    fig.dataset.name = pair.name;
    const img = document.createElement("img");
    img.alt = `Pair ${pair.name}: the image with its mask outlined`;
    img.width = 160;
    img.height = 160;
    const cap = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "pair-name";
    name.textContent = pair.name;
    const dice = document.createElement("span");
    dice.className = "dice";
    dice.textContent = `Dice loss ${pair.dice_loss.toFixed(4)}`;
    cap.append(name, dice);
    if (pair.mask_source && pair.mask_source !== "generated") {
      const source = document.createElement("span");
      source.className = "mask-source";
      source.textContent = `mask: ${pair.mask_source}`;
      cap.append(source);
    } else if (pair.cleaned) {
      const source = document.createElement("span");
      source.className = "mask-source";
      source.textContent = "mask: generated, cleaned";
      cap.append(source);
    }
    fig.append(img, cap);
    return { fig, img, pair };
  });
  $("grid").replaceChildren(...figures.map((f) => f.fig));
  for (const url of old) URL.revokeObjectURL(url);
  loadImages(figures, signal);
}

// at most 4 image requests at once: the rest of the page keeps its connections
async function loadImages(figures, signal) {
  const queue = [...figures];
  const worker = async () => {
    while (queue.length && !signal.aborted) {
      const { img, pair } = queue.shift();
      try {
        const resp = await request(pair.links.preview, { signal });
        const url = URL.createObjectURL(await resp.blob());
        if (signal.aborted) {
          URL.revokeObjectURL(url);
          return;
        }
        grid.urls.push(url);
        img.src = url;
      } catch (err) {
        if (err.name === "AbortError") return;
        img.alt = `Pair ${pair.name}: preview could not be loaded`;
        img.classList.add("broken");
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

// ---------------------------------------------------------------- start

async function start() {
  clearError();
  try {
    await loadModels();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) showError(err);
    return;
  }
  $("key-section").hidden = true;
  $("app").hidden = false;
  if (!apiKey) $("key-status-text").textContent = "No API key needed: this service runs without keys.";
  await loadJobs().catch(showError);
  clearInterval(listTimer);
  listTimer = setInterval(() => {
    if (!document.hidden) refreshJobs();
  }, LIST_REFRESH_MS);
}

function init() {
  setKey(apiKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    clearError();
    setKey(key);
    $("api-key").value = "";
    start();
  });
  $("forget-key").addEventListener("click", () => {
    setKey(null);
    stopEverything();
    $("app").hidden = true;
    start();
  });
  $("error-close").addEventListener("click", clearError);
  $("job-form").addEventListener("submit", submitJob);
  $("f-model").addEventListener("change", fillDefaults);
  $("f-mask_source").addEventListener("change", showRealShare);
  $("reset-defaults").addEventListener("click", fillDefaults);
  $("refresh-jobs").addEventListener("click", refreshJobs);
  $("jobs").addEventListener("click", onJobAction);
  $("pairs-close").addEventListener("click", closeGrid);
  $("pairs-prev").addEventListener("click", () => {
    grid.offset = Math.max(0, grid.offset - PAGE_SIZE);
    loadGrid();
  });
  $("pairs-next").addEventListener("click", () => {
    if (grid.offset + PAGE_SIZE < grid.total) grid.offset += PAGE_SIZE;
    loadGrid();
  });
  start();
}

document.addEventListener("DOMContentLoaded", init);
