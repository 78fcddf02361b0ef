// cnnlens explorer: the browser side of `cnnlens serve`. Plain ES module, no framework, no build step.
// Every request goes through api(); every error the server sends ({"error": {code, message, hint}}) is shown
// in the #error area, never a raw response body.

const $ = (id) => document.getElementById(id);

/** An error answered by the API (or a network failure), with the server's code, message and hint. */
class ApiError extends Error {
  constructor(code, message, hint, status) {
    super(message);
    this.code = code;
    this.hint = hint || "";
    this.status = status;
  }
}

const state = {
  info: null,
  model: null,
  imageId: null,
  imageName: "",
  predictions: [],
  classIndex: null, // null: the top class
  layers: [],
  layer: null,
  method: null,
  options: {}, // per method id: {name: value} as typed by the user
  compare: false,
  layerB: null,
  methodB: null,
  maps: { a: null, b: null }, // the last explain answer of each panel
  seq: { a: 0, b: 0 }, // request counters: an older answer never overwrites a newer one
  uploadStarted: null, // performance.now() when the current image was chosen
  run: null,
  runOffset: 0,
  job: null,
};

// Timings the browser measured, read by the tests and bench/bench_serve_browser.py.
window.cnnlens = { timings: [], lastMapMs: null };

// ------------------------------------------------------------------------------------------------ API
async function api(path, options = {}) {
  const init = { ...options };
  if (init.json !== undefined) {
    init.method = init.method || "POST";
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(init.json);
    delete init.json;
  }
  let response;
  busy(+1);
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError("network", "The server could not be reached.", "Is `cnnlens serve` still running?", 0);
  } finally {
    busy(-1);
  }
  return decode(response);
}

async function decode(response) {
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
  }
  if (!response.ok) {
    const e = body && body.error;
    if (e && e.message) throw new ApiError(e.code, e.message, e.hint, response.status);
    // Not the API's error shape (a proxy, a crash): say what happened without echoing the body.
    throw new ApiError("http_" + response.status, `The server answered HTTP ${response.status}.`, "", response.status);
  }
  return body;
}

let pending = 0;
function busy(delta) {
  pending += delta;
  const el = $("busy");
  el.textContent = pending > 0 ? "working…" : "";
  document.body.dataset.busy = pending > 0 ? "true" : "false";
}

function showError(err) {
  const box = $("error");
  if (!(err instanceof ApiError)) {
    console.error(err);
    err = new ApiError("client", "Something went wrong in the page.", "Reload the page and try again.", 0);
  }
  $("error-message").textContent = err.message;
  $("error-hint").textContent = err.hint ? err.hint : "";
  box.dataset.code = err.code || "";
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").dataset.code = "";
}

/** Run an async action and show its error, if any, in the message area. */
function guarded(fn) {
  return async (...args) => {
    clearError();
    try {
      return await fn(...args);
    } catch (err) {
      showError(err);
      return undefined;
    }
  };
}

/** Point an <img> at url; resolves when it has loaded, rejects with the server's error when it did not. */
function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => {
      img.dataset.state = "loaded";
      resolve(img);
    };
    img.onerror = async () => {
      img.dataset.state = "error";
      img.hidden = true;
      try {
        await decode(await fetch(url));
        reject(new ApiError("image", "An image could not be shown.", "", 0));
      } catch (err) {
        reject(err);
      }
    };
    img.dataset.state = "loading";
    img.hidden = false;
    img.src = url;
  });
}

function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) p.set(k, String(v));
  return p.toString();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const fmt = (x, digits = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–");

// ------------------------------------------------------------------------------------------------ start
async function start() {
  $("error-close").addEventListener("click", clearError);
  window.addEventListener("hashchange", showView);
  window.addEventListener("unhandledrejection", (ev) => showError(ev.reason));

  state.info = await api("/api/info");
  const info = state.info;
  $("model-select").replaceChildren(
    ...info.models.map((m) => el("option", { value: m.id, text: m.label || m.id, selected: m.id === info.default_model })),
  );
  state.model = info.default_model || (info.models[0] && info.models[0].id);
  $("sample-select").append(...info.samples.map((s) => el("option", { value: s.id, text: s.name })));
  $("colormap").replaceChildren(...info.colormaps.map((c) => el("option", { value: c, text: c })));
  const methodOptions = () => info.methods.map((m) => el("option", { value: m.id, text: m.name || m.id }));
  $("method-select").replaceChildren(...methodOptions());
  $("method-b").replaceChildren(...methodOptions());
  state.method = info.default_method || info.methods[0].id;
  state.methodB = state.method;
  $("method-select").value = state.method;
  $("method-b").value = state.methodB;
  renderMethodOptions();

  wireExplain();
  wireNetwork();
  wireRun();
  showView();
  await loadLayers();
}

function showView() {
  const name = (location.hash || "#explain").slice(1);
  const known = ["explain", "network", "run"].includes(name) ? name : "explain";
  for (const v of ["explain", "network", "run"]) {
    $("view-" + v).hidden = v !== known;
    $("tab-" + v).setAttribute("aria-current", v === known ? "page" : "false");
  }
  if (known === "run" && state.run === null) guarded(openRunView)();
}

// ------------------------------------------------------------------------------------------------ Explain
function wireExplain() {
  const drop = $("dropzone");
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) guarded(uploadFile)(file);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("file-input").click();
  });
  $("file-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) guarded(uploadFile)(file);
    e.target.value = "";
  });
  $("sample-select").addEventListener("change", (e) => {
    if (e.target.value) guarded(useSample)(e.target.value);
  });
  $("model-select").addEventListener(
    "change",
    guarded(async (e) => {
      state.model = e.target.value;
      state.classIndex = null;
      await loadLayers();
      showInputImage();
      if (state.imageId) await predictAndExplain();
    }),
  );
  $("method-select").addEventListener("change", (e) => {
    state.method = e.target.value;
    renderMethodOptions();
    explainAll();
  });
  $("opacity").addEventListener("input", (e) => {
    $("opacity-value").textContent = Number(e.target.value).toFixed(2);
  });
  $("opacity").addEventListener("change", () => refreshDisplay());
  $("colormap").addEventListener("change", () => refreshDisplay());
  $("compare-toggle").addEventListener("change", (e) => {
    state.compare = e.target.checked;
    $("panel-b").hidden = !(state.compare && state.imageId);
    document.body.classList.toggle("comparing", state.compare);
    if (state.compare && state.imageId) explainPanel("b");
  });
  $("layer-b").addEventListener("change", (e) => {
    state.layerB = e.target.value;
    explainPanel("b");
  });
  $("method-b").addEventListener("change", (e) => {
    state.methodB = e.target.value;
    explainPanel("b");
  });
  let searchTimer = null;
  $("class-search").addEventListener("input", (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => guarded(searchClasses)(e.target.value), 200);
  });
  for (const p of ["a", "b"]) $("metrics-" + p).addEventListener("click", guarded(() => showMetrics(p)));
}

async function uploadFile(file) {
  clearError();
  state.uploadStarted = performance.now();
  const form = new FormData();
  form.append("file", file, file.name);
  const image = await api("/api/images", { method: "POST", body: form });
  $("sample-select").value = "";
  await setImage(image);
}

async function useSample(sample) {
  clearError();
  state.uploadStarted = performance.now();
  const image = await api("/api/images/sample", { json: { sample } });
  await setImage(image);
}

async function setImage(image) {
  state.imageId = image.image_id;
  state.imageName = image.name;
  state.classIndex = null;
  $("image-name").textContent = `${image.name} · ${image.width}×${image.height}`;
  $("explain-empty").hidden = true;
  showInputImage();
  await predictAndExplain();
}

/** The image as the current model sees it (resized and cropped by its preprocessing). */
function showInputImage() {
  if (!state.imageId) return;
  loadImage($("input-image"), `/api/images/${state.imageId}.png?` + qs({ model: state.model })).catch(showError);
}

async function predictAndExplain() {
  const imageId = state.imageId;
  // The prediction and the first map start together: the map of the top class needs no prediction first.
  const explained = explainAll();
  const pred = await api("/api/predict", { json: { image_id: imageId, model: state.model } });
  if (imageId !== state.imageId) return;
  state.predictions = pred.top;
  renderChips();
  await explained;
}

function renderChips() {
  const shown = state.maps.a ? state.maps.a.class_index : null;
  $("topk").replaceChildren(
    ...state.predictions.map((p) =>
      el(
        "button",
        {
          type: "button",
          class: "chip",
          "data-testid": "class-chip",
          "data-index": p.index,
          "aria-pressed": String(p.index === shown),
          title: `class ${p.index}`,
          onclick: () => chooseClass(p.index),
        },
        el("span", { text: p.name }),
        el("small", { text: fmt(p.score, 2) }),
      ),
    ),
  );
}

async function searchClasses(text) {
  const q = text.trim();
  if (!q) {
    $("class-results").replaceChildren();
    return;
  }
  const res = await api("/api/classes?" + qs({ model: state.model, q, limit: 20 }));
  if ($("class-search").value.trim() !== q) return;
  const more = res.total > res.classes.length ? el("span", { class: "muted", text: `${res.classes.length} of ${res.total}` }) : null;
  $("class-results").replaceChildren(
    ...(res.classes.length
      ? res.classes.map((c) =>
          el("button", {
            type: "button",
            class: "chip",
            "data-testid": "class-result",
            "data-index": c.index,
            text: c.name,
            onclick: () => chooseClass(c.index),
          }),
        )
      : [el("span", { class: "muted", text: "no class matches" })]),
    ...(more ? [more] : []),
  );
}

function chooseClass(index) {
  state.classIndex = index;
  explainAll();
}

async function loadLayers() {
  const res = await api("/api/layers?" + qs({ model: state.model }));
  state.layers = res.layers;
  state.layer = res.default || (res.layers[0] && res.layers[0].name);
  // B starts at the layer before A's (an earlier stage), so that compare mode shows two different choices.
  const at = res.layers.findIndex((l) => l.name === state.layer);
  const other = res.layers[at > 0 ? at - 1 : 1];
  state.layerB = other ? other.name : state.layer;
  renderLayerStrip();
  $("layer-b").replaceChildren(
    ...res.layers.map((l) => el("option", { value: l.name, text: `${l.name}${l.recommended ? " ★" : ""}` })),
  );
  $("layer-b").value = state.layerB;
  fillNetworkLayers();
}

function renderLayerStrip() {
  const usesLayer = methodInfo(state.method).scope === "layer";
  const strip = $("layer-strip");
  strip.classList.toggle("unused", !usesLayer);
  strip.title = usesLayer ? "" : "this method works on the input, not on a layer";
  strip.replaceChildren(
    ...state.layers.map((l) =>
      el(
        "button",
        {
          type: "button",
          class: "layer" + (l.recommended ? " recommended" : ""),
          "data-testid": "layer",
          "data-layer": l.name,
          "aria-pressed": String(l.name === state.layer),
          onclick: () => {
            state.layer = l.name;
            renderLayerStrip();
            explainAll();
          },
        },
        el("span", { class: "name", text: (l.recommended ? "★ " : "") + l.name }),
        el("span", { class: "role", text: l.role || "" }),
        el("span", { class: "shape", text: `${(l.shape || []).join("×")} · /${l.stride ?? "?"}` }),
      ),
    ),
  );
  const chosen = strip.querySelector('[aria-pressed="true"]');
  if (chosen && !strip.hidden) strip.scrollLeft = chosen.offsetLeft - strip.offsetLeft - strip.clientWidth / 2 + chosen.offsetWidth / 2;
}

function methodInfo(id) {
  return (state.info.methods.find((m) => m.id === id) || { scope: "layer", options: [] });
}

function renderMethodOptions() {
  const m = methodInfo(state.method);
  const values = (state.options[m.id] = state.options[m.id] || {});
  const box = $("method-options");
  const rows = m.options.map((o) => {
    const id = `opt-${m.id}-${o.name}`;
    const current = o.name in values ? values[o.name] : o.default;
    let input;
    if (o.type === "bool") {
      input = el("input", { type: "checkbox", id, checked: Boolean(current) });
    } else if (o.type === "choice" && o.choices) {
      input = el("select", { id }, ...o.choices.map((c) => el("option", { value: String(c), text: String(c), selected: c === current })));
    } else if (o.type === "int" || o.type === "float") {
      input = el("input", { type: "number", id, step: o.type === "int" ? "1" : "any", value: current ?? "", placeholder: current == null ? "default" : null });
    } else {
      input = el("input", { type: "text", id, value: current ?? "" });
    }
    input.dataset.option = o.name;
    input.addEventListener("change", () => {
      const v = readOption(o, input);
      if (v === undefined) delete values[o.name];
      else values[o.name] = v;
      explainAll();
    });
    return el(
      "label",
      { class: o.type === "bool" ? "check" : "", title: o.help || "" },
      o.type === "bool" ? input : null,
      el("span", { text: o.name }),
      o.type === "bool" ? null : input,
    );
  });
  box.replaceChildren(...(rows.length ? rows : [el("p", { class: "muted", text: "no options" })]));
  renderLayerStrip();
}

/** The typed value of an option input; undefined when it is empty (the method's default applies). */
function readOption(o, input) {
  if (o.type === "bool") return input.checked;
  const raw = input.value.trim();
  if (raw === "") return undefined;
  if (o.type === "int") return Number.parseInt(raw, 10);
  if (o.type === "float") return Number(raw);
  if (o.type === "choice" && o.choices) return o.choices.find((c) => String(c) === raw) ?? raw;
  return raw;
}

/** The options the user changed from the method's defaults (the server fills in the rest). */
function changedOptions(methodId) {
  const m = methodInfo(methodId);
  const values = state.options[methodId] || {};
  const out = {};
  for (const o of m.options) if (o.name in values && values[o.name] !== o.default) out[o.name] = values[o.name];
  return out;
}

function explainAll() {
  if (!state.imageId) return Promise.resolve();
  const jobs = [explainPanel("a")];
  if (state.compare) jobs.push(explainPanel("b"));
  return Promise.all(jobs);
}

async function explainPanel(p) {
  if (!state.imageId) return;
  const seq = ++state.seq[p];
  const method = p === "a" ? state.method : state.methodB;
  const layer = p === "a" ? state.layer : state.layerB;
  const panel = $("panel-" + p);
  if (p === "a") clearError();
  panel.hidden = false;
  panel.dataset.state = "loading";
  try {
    const res = await api("/api/explain", {
      json: {
        image_id: state.imageId,
        model: state.model,
        class_index: state.classIndex,
        layer,
        method,
        options: p === "a" ? changedOptions(method) : {},
      },
    });
    if (seq !== state.seq[p]) return;
    state.maps[p] = res;
    $("metrics-out-" + p).hidden = true;
    $("info-" + p).textContent =
      `${res.class_name} (#${res.class_index}, score ${fmt(res.score, 3)}) · ${res.method} @ ${res.layer} · ` +
      `${Math.round(res.timing_ms.total)} ms` +
      (res.cached ? " · capture reused" : ` (capture ${Math.round(res.timing_ms.capture)} ms)`);
    $("range-" + p).textContent = `raw signed map [${fmt(res.range[0], 3)}, ${fmt(res.range[1], 3)}]`;
    const base = `/api/maps/${res.map_id}`;
    $("dl-npy-" + p).href = base + "/map.npy";
    $("dl-manifest-" + p).href = base + "/manifest.json";
    const loads = [
      loadImage($("overlay-" + p), overlayUrl(res.map_id)),
      loadImage($("heatmap-" + p), heatmapUrl(res.map_id)),
      loadImage($("signed-" + p), base + "/signed.png"),
    ];
    $("dl-png-" + p).href = overlayUrl(res.map_id);
    await loads[0];
    if (seq !== state.seq[p]) return;
    if (p === "a") {
      renderChips();
      if (state.uploadStarted !== null) {
        const ms = performance.now() - state.uploadStarted;
        state.uploadStarted = null;
        window.cnnlens.lastMapMs = ms;
        window.cnnlens.timings.push({ what: "first map after upload", ms });
      }
    }
    await Promise.all(loads);
    if (seq !== state.seq[p]) return;
    panel.dataset.state = "ready";
    panel.dataset.mapId = res.map_id;
    if (p === "a") showCache();
  } catch (err) {
    if (seq === state.seq[p]) panel.dataset.state = "error";
    showError(err);
  }
}

/** How many recordings the server keeps, and what it evicted (the cache says so when it drops one). */
async function showCache() {
  try {
    const c = await api("/api/cache");
    $("cache-info").textContent =
      `recordings in memory: ${c.entries} of ${c.capacity}` +
      (c.evictions ? ` · ${c.evictions} evicted (last: ${c.last_evicted})` : "");
  } catch (err) {
    $("cache-info").textContent = "";
  }
}

function overlayUrl(mapId) {
  return `/api/maps/${mapId}/overlay.png?` + qs({ colormap: $("colormap").value, opacity: $("opacity").value });
}

function heatmapUrl(mapId) {
  return `/api/maps/${mapId}/heatmap.png?` + qs({ colormap: $("colormap").value });
}

function refreshDisplay() {
  for (const p of ["a", "b"]) {
    const res = state.maps[p];
    if (!res || $("panel-" + p).hidden) continue;
    loadImage($("overlay-" + p), overlayUrl(res.map_id)).catch(showError);
    loadImage($("heatmap-" + p), heatmapUrl(res.map_id)).catch(showError);
    $("dl-png-" + p).href = overlayUrl(res.map_id);
  }
}

async function showMetrics(p) {
  const res = state.maps[p];
  if (!res) return;
  const out = $("metrics-out-" + p);
  out.hidden = false;
  out.replaceChildren(el("p", { class: "muted", text: "computing faithfulness…" }));
  const m = await api("/api/metrics", { json: { map_id: res.map_id } });
  if (state.maps[p] !== res) return;
  const dl = el(
    "dl",
    {},
    el("dt", { text: "Average Drop", title: "score lost when only the map's region is kept (lower is better)" }),
    el("dd", { text: `${fmt(m.average_drop, 1)} %` }),
    el("dt", { text: "Increase in confidence", title: "the score rose when only the map's region was kept" }),
    el("dd", { text: `${fmt(m.increase_in_confidence, 0)} %` }),
    el("dt", { text: "Deletion AUC" }),
    el("dd", { text: fmt(m.deletion_auc), "data-testid": "deletion-auc" }),
    el("dt", { text: "Insertion AUC" }),
    el("dd", { text: fmt(m.insertion_auc), "data-testid": "insertion-auc" }),
  );
  out.replaceChildren(dl, curveSvg(m.curves));
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/** Deletion and insertion curves (class score against the fraction of pixels removed / added) as SVG. */
function curveSvg(curves) {
  const W = 300, H = 170, L = 36, B = 34, T = 22, R = 10;
  const fr = curves.fractions || [];
  const all = [...(curves.deletion || []), ...(curves.insertion || [])].filter((v) => isFinite(v));
  const ymax = Math.max(1e-9, ...all);
  const ymin = Math.min(0, ...all);
  const x = (f) => L + f * (W - L - R);
  const y = (v) => T + (1 - (v - ymin) / (ymax - ymin)) * (H - T - B);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "data-testid": "metrics-curve" });
  const text = (attrs, content) => {
    const t = svgEl("text", attrs);
    t.textContent = content;
    svg.append(t);
  };
  const title = svgEl("title", {});
  title.textContent = "class score as pixels are deleted (red) or inserted (blue), most important first";
  svg.append(title);
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const v of [ymin, ymax]) text({ x: L - 4, y: y(v) + 4, "text-anchor": "end", class: "tick" }, fmt(v, 2));
  for (const f of [0, 0.5, 1]) text({ x: x(f), y: H - B + 12, "text-anchor": "middle", class: "tick" }, String(f));
  text({ x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, "fraction of pixels deleted / inserted");
  text({ x: L, y: 10, class: "tick" }, "score");
  for (const [name, cls, at] of [["deletion", "del", W - R - 70], ["insertion", "ins", W - R]]) {
    const ys = curves[name] || [];
    const pts = ys.map((v, i) => `${x(fr[i] ?? i / Math.max(1, ys.length - 1)).toFixed(1)},${y(v).toFixed(1)}`);
    svg.append(svgEl("polyline", { points: pts.join(" "), class: "curve " + cls, "data-curve": name }));
    text({ x: at, y: 10, "text-anchor": "end", class: "legend " + cls }, "— " + name);
  }
  return svg;
}

// ------------------------------------------------------------------------------------------------ Network
function wireNetwork() {
  $("filters-show").addEventListener(
    "click",
    guarded(async () => {
      const layer = $("filter-layer").value.trim();
      const url = "/api/filters.png?" + qs({ model: state.model, layer: layer || null, max: 64 });
      $("filters-caption").textContent = "";
      await loadImage($("filters-img"), url);
      $("filters-caption").textContent = `(${layer || "the first convolution"})`;
    }),
  );
  $("features-show").addEventListener(
    "click",
    guarded(async () => {
      if (!state.imageId) {
        throw new ApiError("no_image", "No image yet.", "Upload an image or pick a sample in the Explain view first.", 0);
      }
      const res = await api("/api/features", {
        json: { image_id: state.imageId, model: state.model, layer: $("net-layer").value, top: 16 },
      });
      $("features-list").textContent =
        "channels by mean activation: " + res.channels.map((c) => `#${c.index} (${fmt(c.score, 2)})`).join(", ");
      await loadImage($("features-img"), res.url);
    }),
  );
  $("max-start").addEventListener("click", guarded(startMaximize));
  $("max-cancel").addEventListener(
    "click",
    guarded(async () => {
      if (state.job) await api(`/api/jobs/${state.job}`, { method: "DELETE" });
    }),
  );
}

function fillNetworkLayers() {
  const select = $("net-layer");
  const current = select.value;
  select.replaceChildren(
    ...state.layers.map((l) => el("option", { value: l.name, text: `${l.name} (${l.role || ""}, ${(l.shape || []).join("×")})` })),
  );
  select.value = state.layers.some((l) => l.name === current) ? current : state.layer;
  $("layer-names").replaceChildren(...state.layers.map((l) => el("option", { value: l.name })));
}

async function startMaximize() {
  const channels = $("max-channels")
    .value.split(/[\s,]+/)
    .filter(Boolean)
    .map((s) => Number.parseInt(s, 10));
  if (!channels.length || channels.some((c) => !Number.isInteger(c) || c < 0)) {
    throw new ApiError("bad_channels", "Channels must be non-negative whole numbers.", "For example: 0, 5, 12", 0);
  }
  const steps = Number.parseInt($("max-steps").value, 10);
  const res = await api("/api/jobs/maximize", {
    json: { model: state.model, layer: $("net-layer").value, channels, steps },
  });
  const jobId = (state.job = res.job_id);
  $("max-start").disabled = true;
  $("max-cancel").disabled = false;
  $("max-result").hidden = true;
  $("max-progress").value = 0;
  $("max-state").textContent = "queued";
  $("max-state").dataset.state = "queued";
  try {
    for (;;) {
      const job = await api(`/api/jobs/${jobId}`);
      $("max-progress").value = job.progress || 0;
      $("max-state").textContent = job.message || job.state;
      $("max-state").dataset.state = job.state;
      if (job.state === "done") {
        if (job.result_url) await loadImage($("max-result"), job.result_url);
        break;
      }
      if (job.state === "cancelled" || job.state === "error") break;
      await new Promise((r) => setTimeout(r, 300));
    }
  } finally {
    if (state.job === jobId) state.job = null;
    $("max-start").disabled = false;
    $("max-cancel").disabled = true;
  }
}

// ------------------------------------------------------------------------------------------------ Run
function wireRun() {
  $("run-select").addEventListener("change", guarded((e) => loadRun(e.target.value)));
  $("run-pair").addEventListener("change", guarded(() => loadRows(false)));
  for (const id of ["run-filter", "run-true", "run-pred"]) $(id).addEventListener("change", guarded(() => loadRows(false)));
  $("run-clear").addEventListener(
    "click",
    guarded(() => {
      $("run-filter").value = "all";
      $("run-true").value = "";
      $("run-pred").value = "";
      return loadRows(false);
    }),
  );
  $("run-more").addEventListener("click", guarded(() => loadRows(true)));
  $("run-rescan").addEventListener(
    "click",
    guarded(async () => {
      const current = $("run-select").value;
      const found = await api("/api/runs/rescan", { method: "POST" });
      state.info.runs = found.runs;
      await openRunView(current);
    }),
  );
}

async function openRunView(keep) {
  const runs = state.info.runs || [];
  $("run-empty").hidden = runs.length > 0;
  $("run-select").replaceChildren(...runs.map((r) => el("option", { value: r.id, text: `${r.name} (${r.images} images)` })));
  const chosen = runs.find((r) => r.id === keep) || runs[0];
  if (chosen) {
    $("run-select").value = chosen.id;
    await loadRun(chosen.id);
  }
}

async function loadRun(runId) {
  const run = await api(`/api/runs/${runId}`);
  state.run = run;
  $("run-summary").replaceChildren(
    el(
      "dl",
      {},
      el("dt", { text: "model" }),
      el("dd", { text: run.model }),
      el("dt", { text: "accuracy" }),
      el("dd", { text: run.accuracy === null ? "–" : `${(100 * run.accuracy).toFixed(1)} %`, "data-testid": "run-accuracy" }),
      el("dt", { text: "images" }),
      el("dd", { text: String(run.n) }),
      el("dt", { text: "errors" }),
      el("dd", { text: String(run.errors) }),
      el("dt", { text: "methods" }),
      el("dd", { text: (run.methods || []).join(", ") }),
    ),
  );
  const idx = occurring(run);
  const classOptions = () => [el("option", { value: "", text: "any" }), ...idx.map((i) => el("option", { value: i, text: run.classes[i] }))];
  $("run-true").replaceChildren(...classOptions());
  $("run-pred").replaceChildren(...classOptions());
  $("run-filter").value = "all";
  const pairs = run.pairs || [];
  $("run-pair").replaceChildren(...pairs.map((p) => el("option", { value: p.key, text: `${p.method} @ ${p.layer}` })));
  $("run-pair-label").hidden = pairs.length < 2;
  renderConfusion(run, idx);
  await loadRows(false);
}

/** The classes to show: all of them when few, else (ImageNet) only those that occur as true or predicted. */
function occurring(run) {
  const m = run.confusion || [];
  const all = run.classes.map((_, i) => i);
  if (all.length <= 20) return all;
  const seen = new Set();
  m.forEach((row, i) =>
    row.forEach((v, j) => {
      if (v > 0) {
        seen.add(i);
        seen.add(j);
      }
    }),
  );
  return all.filter((i) => seen.has(i));
}

function renderConfusion(run, idx) {
  const m = run.confusion || [];
  let max = 1;
  for (const row of m) for (const v of row) if (v > max) max = v;
  const head = el("tr", {}, el("th", { scope: "col", text: "true \\ pred" }), ...idx.map((j) => el("th", { scope: "col", text: run.classes[j] })));
  const rows = idx.map((i) =>
    el(
      "tr",
      {},
      el("th", { scope: "row", text: run.classes[i] }),
      ...idx.map((j) => {
        const v = (m[i] || [])[j] || 0;
        const td = el("td", {
          class: (i === j ? "diag" : "off") + (v ? "" : " zero"),
          "data-true": i,
          "data-pred": j,
          "data-testid": "confusion-cell",
          title: `${v} image(s): true ${run.classes[i]}, predicted ${run.classes[j]}`,
          tabindex: v ? 0 : null,
          text: String(v),
        });
        td.style.setProperty("--w", String(v / max));
        if (v) {
          const pick = guarded(() => {
            $("run-filter").value = "all";
            $("run-true").value = String(i);
            $("run-pred").value = String(j);
            return loadRows(false);
          });
          td.addEventListener("click", pick);
          td.addEventListener("keydown", (e) => e.key === "Enter" && pick());
        }
        return td;
      }),
    ),
  );
  $("confusion").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

async function loadRows(more) {
  const run = state.run;
  if (!run) return;
  state.runOffset = more ? state.runOffset + 50 : 0;
  const params = {
    filter: $("run-filter").value,
    true: $("run-true").value || null,
    pred: $("run-pred").value || null,
    offset: state.runOffset,
    limit: 50,
  };
  const res = await api(`/api/runs/${run.run_id}/images?` + qs(params));
  if (state.run !== run) return;
  const base = `/api/runs/${run.run_id}/images`;
  const pair = $("run-pair").value ? "?" + qs({ pair: $("run-pair").value }) : "";
  const cards = res.rows.map((r) => {
    const failed = r.status && r.status !== "ok";
    const figs = [];
    if (failed) {
      figs.push(el("p", { class: "muted", text: `not explained: ${r.error || r.status}` }));
    } else {
      figs.push(el("figure", {}, el("img", { src: `${base}/${r.row_id}/original.png`, alt: r.name, loading: "lazy" }), el("figcaption", { text: "image" })));
      figs.push(storedMap(`${base}/${r.row_id}/pred.png${pair}`, `predicted: ${r.pred_name}`));
      if (!r.correct) figs.push(storedMap(`${base}/${r.row_id}/true.png${pair}`, `true: ${r.true_name}`));
    }
    const kind = failed ? "failed" : r.correct ? "correct" : "incorrect";
    return el(
      "article",
      { class: "run-row " + kind, "data-testid": "run-row", "data-row": r.row_id, "data-correct": String(r.correct) },
      el(
        "header",
        {},
        el("strong", { text: r.name }),
        el("span", { text: failed ? ` true ${r.true_name}` : ` true ${r.true_name} · predicted ${r.pred_name} (${fmt(r.score, 2)})` }),
        el("span", { class: "badge", text: { failed: "error", correct: "correct", incorrect: "wrong" }[kind] }),
      ),
      el("div", { class: "figs" }, ...figs),
    );
  });
  if (more) $("run-rows").append(...cards);
  else $("run-rows").replaceChildren(...cards);
  const shown = $("run-rows").children.length;
  $("run-count").textContent = `(${shown} of ${res.total})`;
  $("run-count").dataset.total = String(res.total);
  $("run-more").hidden = shown >= res.total;
}

/** A stored map of a run; "not stored" in its place when the run did not keep it (HTTP 404 not_stored). */
function storedMap(url, caption) {
  const img = el("img", { alt: caption, loading: "lazy" });
  const fig = el("figure", {}, img, el("figcaption", { text: caption }));
  img.addEventListener("error", () => {
    img.replaceWith(el("div", { class: "not-stored", text: "not stored" }));
  });
  img.src = url;
  return fig;
}

start().catch(showError);
