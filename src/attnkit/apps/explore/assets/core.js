// attnkit explore, part 1 of 4: shared state, words and drawing helpers (heatmaps, tooltips).
// core.js, views.js, models.js and app.js are the body of one function,
// attnkitExplorer(root, options) (server.script() joins them), which draws the explorer inside
// `root` (the page's document, or a notebook widget's shadow root) and returns its state.
// options: page (the served or exported page: URL hash, ?lang=, window.attnkit), i18n (the
// catalogues of attnkit/apps/locale/), offline ({view: data}: an exported page's views),
// request (async (view, params, lang) -> data: the notebook widget's kernel), lang, views
// (the tabs to show), view (the first one), initial and params ({view: data or choices}).
// Without offline or request, views come from the server (POST /api/<view>).

const OFFLINE = options.offline || null;
const DEFAULT_PROMPT = "def attention(query, key, value):\n    return ";
const I18N = options.i18n || { en: {} };
const LANGUAGES = Object.keys(I18N);

// The page's language: the widget's, or ?lang=, then the last choice (localStorage), then
// the browser's.
function pickLanguage() {
  if (options.lang && I18N[options.lang]) return options.lang;
  const asked = options.page ? new URLSearchParams(location.search).get("lang") : null;
  if (asked && I18N[asked]) return asked;
  let saved = null;
  try { saved = localStorage.getItem("attnkit.lang"); } catch (err) { /* file: pages */ }
  if (saved && I18N[saved]) return saved;
  const zh = (navigator.languages || [navigator.language || ""]).some((l) => /^zh\b/i.test(l));
  return zh && I18N.zh ? "zh" : "en";
}
const state = { data: {}, query: 1, training: true, view: "tutorial", pending: 0, lang: pickLanguage() };
if (options.page) window.attnkit = state;

// One text of the catalogue, with its {name} fields filled in (numbers and names as given).
function L(key, values) {
  const text = (I18N[state.lang] || {})[key] ?? I18N.en[key];
  if (text === undefined) { console.warn("attnkit: no text " + key); return key; }
  return values ? text.replace(/\{(\w+)\}/g, (m, name) => (name in values ? String(values[name]) : m)) : text;
}

// The page's fixed texts: data-i18n (text) and data-i18n-title (tooltip) attributes.
function applyLanguage() {
  if (options.page) document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = L(node.dataset.i18n);
  for (const node of root.querySelectorAll("[data-i18n-title]")) node.title = L(node.dataset.i18nTitle);
}

// ---------------------------------------------------------------- helpers
const $ = (id) => root.getElementById(id);  // a Document or a ShadowRoot
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
const fmt = (v) => (v === null ? "-inf" : v.toFixed(4));
const vecText = (row) => "[" + row.map(fmt).join(", ") + "]";

async function api(view, params) {
  if (OFFLINE) {
    if (params !== null) throw new Error(L("explore.offline_error"));
    const data = OFFLINE[view];
    if (data.error) throw new Error((data.errors || {})[state.lang] || data.error);
    return data;
  }
  if (options.request) return options.request(view, params, state.lang);
  if (!options.page) throw new Error(L("explore.static_error"));
  const response = await fetch("api/" + view, {
    method: "POST", headers: { "Content-Type": "application/json", "X-Attnkit-Language": state.lang },
    body: JSON.stringify(params || {}) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function showError(view, err) {
  const box = $(view + "-error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

const tip = $("tip");
function hover(canvas, lookup) {
  canvas.addEventListener("mousemove", (e) => {
    const r = canvas.getBoundingClientRect();
    const text = lookup((e.clientX - r.left) * canvas.width / r.width,
                        (e.clientY - r.top) * canvas.height / r.height);
    if (!text) { tip.hidden = true; return; }
    tip.textContent = text; tip.hidden = false;
    tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 12) + "px";
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
}

// Sequential blue for weights in [0, 1]; diverging red/blue for signed values.
function color(v, scale, signed) {
  if (v === null) return "#d9dce3";
  const t = Math.max(-1, Math.min(1, v / (scale || 1)));
  if (!signed || t >= 0) {
    const a = Math.abs(t);
    return `rgb(${Math.round(255 - a * 224)},${Math.round(255 - a * 177)},${Math.round(255 - a * 99)})`;
  }
  const a = -t;
  return `rgb(${Math.round(255 - a * 45)},${Math.round(255 - a * 165)},${Math.round(255 - a * 160)})`;
}

// A labelled heatmap of `matrix` (rows x cols) on a new canvas inside a .figure.
function heatmap(title, matrix, rowLabels, colLabels, opts = {}) {
  const rows = matrix.length, cols = matrix[0].length;
  const cell = opts.cell || (cols > 12 || rows > 12 ? 22 : 46);
  const left = opts.left ?? 8 + 7 * Math.max(...rowLabels.map((s) => String(s).length));
  const top = opts.top ?? 8 + (opts.rotate ? 7 * Math.max(...colLabels.map((s) => String(s).length)) : 16);
  const canvas = el("canvas", { width: left + cols * cell + 4, height: top + rows * cell + 4 });
  canvas.dataset.title = title;
  const ctx = canvas.getContext("2d");
  const finite = matrix.flat().filter((v) => v !== null);
  const signed = opts.signed ?? finite.some((v) => v < 0);
  const scale = opts.scale || Math.max(1e-9, ...finite.map(Math.abs));
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "12px ui-monospace, monospace"; ctx.textBaseline = "middle";
  for (let i = 0; i < rows; i++) {
    ctx.fillStyle = "#1d2433"; ctx.textAlign = "right";
    ctx.fillText(rowLabels[i], left - 4, top + i * cell + cell / 2);
    for (let j = 0; j < cols; j++) {
      const v = matrix[i][j];
      ctx.fillStyle = color(v, scale, signed);
      ctx.fillRect(left + j * cell, top + i * cell, cell - 1, cell - 1);
      if (cell >= 30) {
        const dark = v !== null && Math.abs(v / scale) > 0.55;
        ctx.fillStyle = dark ? "#fff" : "#1d2433"; ctx.textAlign = "center";
        ctx.font = `${cell >= 40 ? 11 : 10}px ui-monospace, monospace`;
        ctx.fillText(v === null ? "-inf" : v.toFixed(2), left + j * cell + cell / 2, top + i * cell + cell / 2);
        ctx.font = "12px ui-monospace, monospace";
      }
    }
  }
  ctx.fillStyle = "#1d2433";
  for (let j = 0; j < cols; j++) {
    ctx.save(); ctx.translate(left + j * cell + cell / 2, top - 4);
    if (opts.rotate) { ctx.rotate(-Math.PI / 2); ctx.textAlign = "left"; }
    else { ctx.textAlign = "center"; ctx.textBaseline = "bottom"; }
    ctx.fillText(colLabels[j], 0, 0); ctx.restore();
  }
  hover(canvas, (x, y) => {
    const i = Math.floor((y - top) / cell), j = Math.floor((x - left) / cell);
    if (i < 0 || j < 0 || i >= rows || j >= cols) return null;
    const v = matrix[i][j];
    return opts.describe ? opts.describe(i, j, v) :
      `${title}[${i}][${j}]  ${rowLabels[i]} -> ${colLabels[j]}: ${v === null ? "-inf" : v.toFixed(6)}`;
  });
  const fig = el("div", { class: "figure", style: `max-width:${Math.max(canvas.width, 180)}px` },
                 el("h4", {}, title), canvas);
  if (opts.caption) fig.append(el("div", { class: "caption" }, opts.caption));
  return fig;
}

function vecLine(key, label, row) {
  return el("code", { class: "vec", "data-key": key }, label.padEnd(34) + " " + vecText(row));
}
