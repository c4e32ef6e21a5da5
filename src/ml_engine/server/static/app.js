// ml-engine UI: plain JS against the same REST API that curl uses; no build step.
"use strict";

const $ = (selector) => document.querySelector(selector);
const watched = new Map(); // job id → poll timer

// Server text (job errors, model names) goes into markup only escaped.
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function token() { return localStorage.getItem("ml-engine-token") || ""; }

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("#token-form").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();
const postJson = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});
const pct = (value) => (value == null ? "—" : `${(100 * value).toFixed(2)}%`);

// ---- models and training ----------------------------------------------------------------------

// "cuda" is Lightning's alias of "gpu" (ACCELERATORS in training/choices.py): offer one of the two
const DEVICE_ALIASES = { cuda: "gpu" };

function fillDevices(devices, preferred) {
  const select = $("#device");
  const current = select.value;
  const offered = devices.filter((d) => !(DEVICE_ALIASES[d] && devices.includes(DEVICE_ALIASES[d])));
  select.innerHTML = offered.map((d) => `<option>${d}</option>`).join("");
  // loadModels runs again after each finished job: keep what the user picked
  const choice = [current, preferred].find((d) => d && offered.includes(d));
  if (choice) select.value = choice;
}

async function loadModels() {
  const { models, devices, default_device: defaultDevice } = await getJson("/ml/models");
  fillDevices(devices, defaultDevice);
  const rows = models.map((m) => `<tr data-model="${m.name}">
      <td>${m.name}${m.best ? `<div class="trained muted">best: ${trainedText(m.best)}</div>` : ""}</td>
      <td class="val-acc">${pct(m.best && m.best.val_acc)}</td>
      <td>${pct(m.best && m.best.test_acc)}</td>
      <td>${m.best ? m.best.date.replace("T", " ") : "—"}</td><td>${m.runs}</td>
      <td>${m.trainable ? `<button class="train-btn" data-model="${m.name}">Train</button>` : ""}</td>
    </tr>`);
  $("#models-table tbody").innerHTML = rows.join("");
  document.querySelectorAll(".train-btn").forEach((button) => {
    button.onclick = () => startTraining(button.dataset.model).catch((e) => showError(e.message));
  });
  const select = $("#predict-model");
  const current = select.value;
  select.innerHTML = models.filter((m) => m.best)
    .map((m) => `<option value="${m.name}">${m.name} (${pct(m.best.val_acc)})</option>`).join("");
  if (current) select.value = current;
}

// a network's name says little for torchvision's: the run names its architecture and data
const trainedText = (run) => `${escapeHtml(run.architecture)} on ${escapeHtml(run.data.label)}`;

async function loadRuns() {
  const { runs } = await getJson("/ml/runs");
  $("#runs-table tbody").innerHTML = runs.map((r) => `<tr data-run="${escapeHtml(r.run)}">
      <td class="run-name">${escapeHtml(r.run)}</td><td class="architecture">${escapeHtml(r.architecture)}</td>
      <td class="data">${escapeHtml(r.data.label)}</td><td>${pct(r.val_acc)}</td>
      <td><button class="curves-btn">Curves</button> ${r.trainable
        ? `<button class="retrain-btn">Train again</button>`
        : `<span class="not-trainable muted">${escapeHtml(r.not_trainable)}</span>`}</td>
    </tr>`).join("") || `<tr><td colspan="5" class="muted">no finished runs yet</td></tr>`;
  runs.forEach((r, i) => {
    const row = $("#runs-table tbody").rows[i];
    row.querySelector(".curves-btn").onclick = () => showRunCurves(r.run).catch((e) => showError(e.message));
    const again = row.querySelector(".retrain-btn");
    if (again) again.onclick = () => startTraining(r.train_model, r.run).catch((e) => showError(e.message));
  });
}

async function startTraining(model, dataFrom) {
  showError("");
  const body = { model, epochs: Number($("#epochs").value), device: $("#device").value };
  if (dataFrom) body.data_from = dataFrom;
  const job = await (await postJson("/ml/train", body)).json();
  renderJob(job);
  watchJob(job.id);
  await showCurves(job.id);
}

function progressText(job) {
  const p = job.progress || {};
  if (p.epoch == null) return job.status === "queued" ? "waiting" : "starting";
  const batches = p.batches_per_epoch ? `${p.batch}/${p.batches_per_epoch}` : p.batch;
  return `epoch ${p.epoch}/${p.max_epochs} · batch ${batches} · step ${p.step} · ${p.stage}`;
}

function metricsText(job) {
  const m = Object.keys(job.metrics || {}).length ? job.metrics : (job.progress || {}).metrics || {};
  const parts = [];
  if (m["val/acc"] != null) parts.push(`val ${pct(m["val/acc"])}`);
  if (m["test/acc"] != null) parts.push(`test ${pct(m["test/acc"])}`);
  if (m["train/loss_step"] != null) parts.push(`loss ${m["train/loss_step"].toFixed(3)}`);
  return parts.join(" · ");
}

function renderJob(job) {
  let row = document.getElementById(`job-${job.id}`);
  if (!row) {
    row = document.createElement("tr");
    row.id = `job-${job.id}`;
    row.className = "job";
    $("#jobs-table tbody").prepend(row);
  }
  const p = job.progress || {};
  const done = (p.epochs_done || 0) * (p.batches_per_epoch || 1) + (p.stage === "fit" ? p.batch || 0 : 0);
  const total = (p.max_epochs || 1) * (p.batches_per_epoch || 1);
  const value = job.status === "succeeded" ? total : Math.min(done, total);
  row.dataset.status = job.status;
  row.innerHTML = `<td>${job.id}</td><td>${escapeHtml(job.model)}</td><td class="status">${job.status}</td>
    <td><progress max="${total}" value="${value}"></progress>
        <span class="progress-text muted">${progressText(job)}</span></td>
    <td class="metrics">${job.error ? `<span class="error">${escapeHtml(job.error)}</span>` : metricsText(job)}</td>
    <td><button class="curves-btn">Curves</button>${job.final ? "" : ` <button class="cancel-btn">Cancel</button>`}</td>`;
  row.querySelector(".curves-btn").onclick = () => showCurves(job.id).catch((e) => showError(e.message));
  const cancel = row.querySelector(".cancel-btn");
  if (cancel) {
    cancel.onclick = () => api(`/ml/jobs/${job.id}`, { method: "DELETE" })
      .then((r) => r.json()).then(renderJob).catch((e) => showError(e.message));
  }
}

function watchJob(id) {
  if (watched.has(id)) return;
  const poll = async () => {
    try {
      const job = await getJson(`/ml/jobs/${id}`);
      renderJob(job);
      if (job.final) {
        clearInterval(watched.get(id));
        watched.delete(id);
        if (job.status === "succeeded") await Promise.all([loadModels(), loadRuns()]);
      }
    } catch (e) { showError(e.message); }
  };
  watched.set(id, setInterval(poll, 1000));
  poll();
}

async function loadJobs() {
  const { jobs } = await getJson("/ml/jobs?limit=10");
  jobs.reverse().forEach((job) => {
    renderJob(job);
    if (!job.final) watchJob(job.id);
  });
  if (jobs.length) await showCurves(jobs[jobs.length - 1].id); // the newest job
}

// ---- curves -----------------------------------------------------------------------------------

// one chart per x axis (training step, epoch) and quantity; each reads the series whose names
// hold its word (train/loss_step, val/loss, train/acc, val/acc)
// The learning rate has a block of its own ("lr", by step: logged every few steps) and
// appears per epoch in a server job's progress file.
const CHARTS = [
  { key: "step-loss", kind: "step", word: "loss", title: "Loss per step" },
  { key: "epoch-loss", kind: "epoch", word: "loss", title: "Loss per epoch" },
  { key: "epoch-acc", kind: "epoch", word: "acc", title: "Accuracy per epoch" },
  { key: "lr", kind: "lr", axis: "step", word: "lr-", title: "Learning rate per step" },
  { key: "epoch-lr", kind: "epoch", word: "lr-", title: "Learning rate per epoch" },
];
const NO_POINTS = { x: [], series: {} };
const COLORS = ["#c33", "#36c", "#393", "#c93", "#939", "#399"];
// uPlot writes series labels into its legend itself: names outside this pattern stay out
const SAFE_NAME = /^[\w\/.-]{1,64}$/;
const curves = { shown: null, timer: null, charts: new Map() }; // chart key → uPlot

function chartData(block, word) {
  const names = Object.keys(block.series).filter((n) => SAFE_NAME.test(n) && n.includes(word));
  return { names, data: [block.x, ...names.map((n) => block.series[n])] };
}

function drawChart(spec, block) {
  const key = spec.key;
  const axis = spec.axis || spec.kind;
  const { names, data } = chartData(block || NO_POINTS, spec.word);
  let chart = curves.charts.get(key);
  const sameSeries = chart && chart.series.slice(1).map((s) => s.label).join() === names.join();
  if (chart && (!names.length || !sameSeries)) {
    chart.destroy();
    document.getElementById(`chart-${key}`).remove();
    curves.charts.delete(key);
    chart = null;
  }
  if (!names.length) return;
  if (chart) chart.setData(data);
  else {
    const box = document.createElement("div");
    box.id = `chart-${key}`;
    box.className = "chart";
    box.innerHTML = `<h3>${escapeHtml(spec.title)}</h3>`;
    $("#curves-charts").append(box);
    const opts = {
      width: chartWidth(), height: 180,
      scales: { x: { time: false } },
      // epochs are whole numbers: no 1.5 tick between them
      axes: [{ label: axis, ...(axis === "epoch" ? { incrs: [1, 2, 5, 10, 20, 50, 100] } : {}) }, {}],
      series: [{ label: axis }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], spanGaps: true }))],
    };
    chart = new uPlot(opts, data, box);
    curves.charts.set(key, chart);
  }
  // the point count in the DOM: what a test (or a curious user) can read back
  document.getElementById(`chart-${key}`).dataset.points = String(data[0].length);
}

// uPlot draws at a fixed pixel size: follow the card's width when the window changes
const chartWidth = () => Math.max(240, $("#curves-charts").clientWidth - 8);
window.addEventListener("resize", () => {
  curves.charts.forEach((chart) => chart.setSize({ width: chartWidth(), height: 180 }));
});

const SOURCES = { progress: "its progress file", csv: "its CSV log", tensorboard: "its TensorBoard log" };

// what the Curves card shows: a job (polled while it runs) or a finished run (read once)
async function drawCurves(target) {
  const result = await getJson(target.path);
  if (curves.shown !== target) return false; // another job or run was picked meanwhile
  CHARTS.forEach((spec) => drawChart(spec, result[spec.kind]));
  const lr = result.lr || NO_POINTS;
  const points = result.step.x.length + result.epoch.x.length + lr.x.length;
  const what = target.job ? `job ${target.job} (run ${result.run})` : `run ${result.run}`;
  const rates = lr.x.length ? `, ${lr.x.length} learning rates` : "";
  $("#curves-title").textContent = points
    ? `${what}: ${result.step.x.length} steps, ${result.epoch.x.length} epochs${rates}, from ${SOURCES[result.source] || "its logs"}`
    : `${what}: no curves recorded${result.final === false ? " yet" : ""}`;
  return result.final !== false;
}

async function showTarget(target) {
  clearInterval(curves.timer);
  curves.shown = target;
  // a running job's curves grow: poll until it is final, then draw once more
  const poll = async () => {
    try {
      if (await drawCurves(target)) clearInterval(curves.timer);
    } catch (e) { clearInterval(curves.timer); showError(e.message); }
  };
  curves.timer = setInterval(poll, 1000);
  await poll();
}

const showCurves = (id) => showTarget({ job: id, path: `/ml/jobs/${encodeURIComponent(id)}/curves` });
const showRunCurves = (run) => showTarget({ run, path: `/ml/runs/${encodeURIComponent(run)}/curves` });

// ---- sweeps -----------------------------------------------------------------------------------

const fixed = (value) => (value == null ? "—" : Number(value).toPrecision(4));

async function loadSweeps() {
  const { sweeps } = await getJson("/ml/sweeps");
  const select = $("#sweep");
  select.innerHTML = sweeps.length
    ? sweeps.map((s) => `<option value="${escapeHtml(s.name)}">${escapeHtml(s.name)} (${escapeHtml(s.kind)}, ${s.jobs} jobs)</option>`).join("")
    : `<option value="" disabled selected>no sweeps with a summary</option>`;
  select.onchange = () => showSweep(select.value).catch((e) => showError(e.message));
  if (sweeps.length) await showSweep(sweeps[0].name);
}

async function showSweep(name) {
  const sweep = await getJson(`/ml/sweeps/${encodeURIComponent(name)}`);
  $("#sweep-metric").textContent = `${sweep.metric} (${sweep.mode})`;
  $("#sweep-info").textContent = `sorted by ${sweep.metric}, ${sweep.mode === "max" ? "highest" : "lowest"} first`;
  $("#sweep-table tbody").innerHTML = sweep.rows.map((r, i) => `<tr>
      <td>${i + 1}</td><td>${escapeHtml(r.job)}</td><td>${escapeHtml(r.overrides)}</td>
      <td>${escapeHtml(r.status)}${r.error ? ` <span class="error">${escapeHtml(r.error)}</span>` : ""}</td>
      <td class="value">${fixed(r.value)}</td></tr>`).join("");
  const img = $("#sweep-plot");
  // only the server's own fixed route, never another address
  const plot = sweep.plot && sweep.plot.startsWith("/ml/sweeps/") ? sweep.plot : null;
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.hidden = !plot;
  // fetched with the API key (an <img src> could not send it), shown from a blob URL
  if (plot) img.src = URL.createObjectURL(await (await api(plot)).blob());
  await showStudy(sweep.study || []);
}

// only the server's own study route, never another address
const isStudyUrl = (url) => typeof url === "string" && url.startsWith("/ml/sweeps/") && url.includes("/study/");

// the Optuna study's plots (write_study_plots): each PNG, linked to its interactive page
async function showStudy(plots) {
  const box = $("#study-plots");
  box.querySelectorAll("img").forEach((img) => { if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src); });
  const shown = plots.filter((p) => isStudyUrl(p.png) && isStudyUrl(p.html));
  box.innerHTML = shown.map((p) => `<figure class="study-plot" data-plot="${escapeHtml(p.name)}">
      <img alt="${escapeHtml(p.title)}">
      <figcaption>${escapeHtml(p.title)} · <a href="${escapeHtml(p.html)}" target="_blank" rel="noopener">interactive</a></figcaption>
    </figure>`).join("");
  $("#study-title").hidden = !shown.length;
  const figures = [...box.querySelectorAll("figure")];
  figures.forEach((figure, i) => {
    figure.querySelector("a").onclick = (e) => {
      if (!token()) return; // a plain link: the page and its plotly.min.js need no key
      e.preventDefault();
      openStudyPage(shown[i].html).catch((error) => showError(error.message));
    };
  });
  // fetched with the API key, as summary.png is
  await Promise.all(figures.map(async (figure, i) => {
    figure.querySelector("img").src = URL.createObjectURL(await (await api(shown[i].png)).blob());
  }));
}

// With an API key a new tab could not send it: fetch the page and its plotly.min.js with the
// key and open the page from blob URLs instead
async function openStudyPage(url) {
  const tab = window.open("", "_blank"); // opened now, while the click still allows a popup
  const script = url.replace(/[^/]*$/, "plotly.min.js");
  const [page, plotly] = await Promise.all([api(url).then((r) => r.text()), api(script).then((r) => r.blob())]);
  const scriptUrl = URL.createObjectURL(plotly);
  const html = page.replace('src="plotly.min.js"', `src="${scriptUrl}"`);
  const pageUrl = URL.createObjectURL(new Blob([html], { type: "text/html" }));
  if (tab) tab.location = pageUrl;
  else window.location = pageUrl;
}

// ---- drawing and prediction -------------------------------------------------------------------

function setupCanvas() {
  const canvas = $("#canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = ctx.lineJoin = "round";
  let drawing = false;
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    ctx.beginPath();
    ctx.moveTo(...point(e));
    ctx.lineTo(...point(e));
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.lineTo(...point(e));
    ctx.stroke();
  });
  ["pointerup", "pointerleave"].forEach((name) => canvas.addEventListener(name, () => { drawing = false; }));
  $("#clear-btn").onclick = () => { clear(); $("#prediction").hidden = true; };
  $("#predict-btn").onclick = () => predict(canvas).catch((e) => showError(e.message));
}

async function predict(canvas) {
  showError("");
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("image", blob, "canvas.png");
  if ($("#predict-model").value) form.append("model", $("#predict-model").value);
  const result = await (await api("/ml/predict", { method: "POST", body: form })).json();
  const best = result.predictions[0];
  $("#prediction-digit").textContent = best.digit;
  $("#prediction-confidence").textContent = `(${pct(best.confidence)})`;
  $("#probabilities").innerHTML = best.probabilities.map((p, digit) =>
    `<div class="bar">${digit} <span class="fill" style="width:${Math.round(p * 150)}px"></span> ${pct(p)}</div>`).join("");
  $("#prediction-run").textContent = `${result.model}, run ${result.run}`;
  $("#prediction").hidden = false;
}

// ---- generation -------------------------------------------------------------------------------

function llmModelLabel(m) {
  if (m.file_on_disk) return m.name;
  return m.embedded ? `${m.name} (written on first use)` : `${m.name} (no file on disk)`;
}

async function loadLlmModels() {
  const { backends, models, default_model: defaultModel } = await getJson("/llm/models");
  $("#backend").innerHTML = backends.map((b) => `<option>${b}</option>`).join("");
  const options = models.map((m) => `<option value="${m.name}">${llmModelLabel(m)}</option>`);
  // with no usable file, say so instead of preselecting a model that llama.cpp cannot load
  // (the mock backend still takes any of them)
  if (!defaultModel) options.unshift(`<option value="" disabled>no model file on disk</option>`);
  const select = $("#llm-model");
  select.innerHTML = options.join("");
  select.value = defaultModel || "";
}

async function generate() {
  showError("");
  const output = $("#generation-output");
  const status = $("#generation-status");
  output.textContent = "";
  if (!$("#llm-model").value) throw new Error("choose a model: none has a file on disk (the mock backend takes any)");
  status.textContent = "generating…";
  const body = {
    backend: $("#backend").value, model: $("#llm-model").value, prompt: $("#prompt").value,
    max_tokens: Number($("#max-tokens").value), stream: true,
  };
  const response = await postJson("/llm/generate", body);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
      if (event === "token") output.textContent += data.token;
      else if (event === "done") status.textContent = `done: ${data.pieces} pieces in ${data.timings.total_s}s (${data.engine})`;
      else if (event === "error") { status.textContent = "failed"; showError(data.error); }
    }
  }
}

// ---- start ------------------------------------------------------------------------------------

async function start() {
  $("#token-form").onsubmit = (e) => {
    e.preventDefault();
    localStorage.setItem("ml-engine-token", $("#token").value);
    $("#token-form").hidden = true;
    start();
  };
  try {
    const health = await (await fetch("/health")).json();
    $("#health").textContent = health.status;
    await Promise.all([loadModels(), loadRuns(), loadJobs(), loadSweeps()]);
    await loadLlmModels().catch((e) => showError(`LLM: ${e.message}`));
  } catch (e) { showError(e.message); }
}

setupCanvas();
$("#generate-btn").onclick = () => generate().catch((e) => {
  $("#generation-status").textContent = "failed";
  showError(e.message);
});
start();
