// attnkit explore: draws the views the server computes (POST /api/<view>); no dependencies.
// An exported page carries the default inputs' views in window.ATTNKIT_OFFLINE instead.
"use strict";

const OFFLINE = window.ATTNKIT_OFFLINE || null;
const DEFAULT_PROMPT = "def attention(query, key, value):\n    return ";
const state = { data: {}, query: 1, training: true, view: "tutorial", pending: 0 };
window.attnkit = state;

// ---------------------------------------------------------------- helpers
const $ = (id) => document.getElementById(id);
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
    if (params !== null) throw new Error("This exported copy shows the default inputs only; " +
      "new input needs the server (run: attnkit explore).");
    const data = OFFLINE[view];
    if (data.error) throw new Error(data.error);
    return data;
  }
  const response = await fetch("api/" + view, {
    method: "POST", headers: { "Content-Type": "application/json" },
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
      if (cell >= 40) {
        const dark = v !== null && Math.abs(v / scale) > 0.55;
        ctx.fillStyle = dark ? "#fff" : "#1d2433"; ctx.textAlign = "center";
        ctx.font = "11px ui-monospace, monospace";
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
  const fig = el("div", { class: "figure" }, el("h4", {}, title), canvas);
  if (opts.caption) fig.append(el("div", { class: "caption" }, opts.caption));
  return fig;
}

function vecLine(key, label, row) {
  return el("code", { class: "vec", "data-key": key }, label.padEnd(34) + " " + vecText(row));
}

// ---------------------------------------------------------------- tutorial view
const DIMS = ["d0", "d1", "d2"], OUT = ["out0", "out1"];

function renderTutorial(d) {
  const body = $("tutorial-body"); body.textContent = "";
  const T = d.tokens.length, q = Math.min(state.query, T - 1), n = q + 1, tok = d.tokens;
  const add = (...nodes) => body.append(...nodes);
  const picker = el("div", { class: "tokens" }, "query: ");
  tok.forEach((t, i) => {
    const b = el("button", { type: "button", class: i === q ? "selected" : "" }, t);
    b.addEventListener("click", () => { state.query = i; renderTutorial(d); });
    picker.append(b);
  });
  const s = d.simple, tr = d.trainable, c = d.causal, h = d.heads;
  add(el("h2", {}, "3.3.1 A simple self-attention mechanism without trainable weights"), picker,
      el("div", { class: "row" }, heatmap("inputs", d.inputs, tok, DIMS),
         heatmap(`attn_scores_${n} = inputs @ inputs[${q}]`, s.attn_scores.map((r) => [r[q]]), tok, [tok[q]],
                 { describe: (i, j, v) => `x(${i + 1}) . x(${n}) = ${v.toFixed(6)}` }),
         heatmap(`attn_weights_${n} = softmax`, s.attn_weights[q].map((v) => [v]), tok, [tok[q]], { scale: 1 }),
         heatmap(`context_vec_${n}`, [s.context_vecs[q]], [tok[q]], DIMS)),
      vecLine("simple.attn_scores.q", `attn_scores_${n} (query "${tok[q]}")`, s.attn_scores[q]),
      vecLine("simple.attn_weights.q", `attn_weights_${n} (softmax)`, s.attn_weights[q]),
      vecLine("simple.context_vec.q", `context_vec_${n} = z(${n})`, s.context_vecs[q]));
  add(el("h2", {}, "3.3.2 Computing attention weights for all input tokens"),
      el("div", { class: "row" }, heatmap("attn_scores = inputs @ inputs.T", s.attn_scores, tok, tok, { rotate: true }),
         heatmap("attn_weights = softmax(attn_scores, dim=-1)", s.attn_weights, tok, tok, { rotate: true, scale: 1 }),
         heatmap("all_context_vecs = attn_weights @ inputs", s.context_vecs, tok, DIMS)));
  add(el("h2", {}, `3.4.1 Trainable weights W_query, W_key, W_value (seed ${tr.seed_v1}, d_out = 2)`),
      el("div", { class: "row" }, heatmap("W_query", tr.W_query, DIMS, OUT), heatmap("W_key", tr.W_key, DIMS, OUT),
         heatmap("W_value", tr.W_value, DIMS, OUT), heatmap("queries", tr.queries, tok, OUT),
         heatmap("keys", tr.keys, tok, OUT), heatmap("values", tr.values, tok, OUT)),
      el("div", { class: "row" }, heatmap("attn_scores = queries @ keys.T", tr.attn_scores, tok, tok, { rotate: true }),
         heatmap(`attn_weights = softmax(attn_scores / sqrt(${tr.d_k}))`, tr.attn_weights, tok, tok, { rotate: true, scale: 1 }),
         heatmap("context_vecs = attn_weights @ values", tr.context_vecs, tok, OUT)),
      vecLine("trainable.query.q", `query_${n}`, tr.queries[q]),
      vecLine("trainable.attn_scores.q", `attn_scores_${n}`, tr.attn_scores[q]),
      vecLine("trainable.attn_weights.q", `attn_weights_${n} (scaled by 1/sqrt(2))`, tr.attn_weights[q]),
      vecLine("trainable.context_vec.q", `context_vec_${n}`, tr.context_vecs[q]));
  add(el("h2", {}, "3.4.2 A compact self-attention class"),
      el("div", { class: "row" }, heatmap(`SelfAttentionV1(3, 2), seed ${tr.seed_v1}`, tr.context_vecs, tok, OUT),
         heatmap(`SelfAttentionV2(3, 2), seed ${tr.seed_v2}`, tr.sa_v2, tok, OUT)));
  add(el("h2", {}, "3.5.1 The causal mask, both methods side by side (sa_v2's weights)"),
      el("div", { class: "row" },
         el("div", { class: "side" }, el("b", {}, "Method 1: mask after softmax, renormalise"),
            el("div", { class: "row" }, heatmap("attn_weights", c.attn_weights, tok, tok, { rotate: true, scale: 1 }),
               heatmap("mask_simple = tril(ones)", c.mask_simple, tok, tok, { rotate: true, scale: 1 }),
               heatmap("masked_simple_norm", c.masked_simple_norm, tok, tok, { rotate: true, scale: 1 }))),
         el("div", { class: "side" }, el("b", {}, "Method 2: -inf before softmax"),
            el("div", { class: "row" }, heatmap("masked = attn_scores.masked_fill(-inf)", c.masked_scores, tok, tok, { rotate: true }),
               heatmap("attn_weights = softmax(masked / sqrt(d_k))", c.causal_weights, tok, tok, { rotate: true, scale: 1 })))),
      el("p", { "data-key": "causal.agree" }, `Both methods agree: max |difference| = ${c.max_difference.toExponential(1)}`));
  const toggle = el("input", { type: "checkbox", id: "training" });
  toggle.checked = state.training;
  toggle.addEventListener("change", () => { state.training = toggle.checked; renderTutorial(d); });
  const shown = state.training ? c.dropped : c.causal_weights;
  add(el("h2", {}, `3.5.2 Dropout on the attention weights (p = ${c.dropout_p}, seed ${c.dropout_seed})`),
      el("label", {}, toggle, " training mode (dropout active; survivors scaled by 1/(1-p) = 2)"),
      el("div", { class: "row" }, heatmap(state.training ? "dropout(attn_weights), training" : "attn_weights, eval mode (no dropout)",
                                        shown, tok, tok, { rotate: true, scale: 2 })));
  const H = h.num_heads, headFig = (name, w, i) => heatmap(`${name} head ${i}`, w[i], tok, tok, { rotate: true, scale: 1, cell: 24 });
  add(el("h2", {}, `3.5.3-3.6 CausalAttention, stacked heads vs weight split (seed ${h.seed}, ${H} heads)`),
      el("div", { class: "row" }, heatmap("CausalAttention(3, 2, T, 0.0)", h.ca, tok, OUT)),
      el("div", { class: "row" },
         el("div", { class: "side" }, el("b", {}, "MultiHeadAttentionWrapper: heads stacked, outputs concatenated"),
            el("div", { class: "row" }, ...[...Array(H).keys()].map((i) => headFig("wrapper", h.wrapper_weights, i)),
               heatmap("output (T, num_heads * d_out)", h.wrapper, tok, ["h0:0", "h0:1", "h1:0", "h1:1"]))),
         el("div", { class: "side" }, el("b", {}, "MultiHeadAttention: one projection split into heads + out_proj"),
            el("div", { class: "row" }, ...[...Array(H).keys()].map((i) => headFig("mha", h.mha_weights, i)),
               heatmap("output (T, d_out)", h.mha, tok, OUT)))));
  if (d.checks.length) {
    const table = el("table", { class: "checks" }, el("tr", {}, el("th", {}, "value"), el("th", {}, "published"),
                     el("th", {}, "this page"), el("th", {}, "")));
    for (const ck of d.checks) table.append(el("tr", {}, el("td", {}, ck.name), el("td", {}, vecText(ck.published)),
      el("td", {}, vecText(ck.got)), el("td", { class: ck.ok ? "ok" : "bad" }, ck.ok ? "matches" : "DIFFERS")));
    add(el("h2", {}, "Published values (as in attnkit walkthrough)"), table);
  }
}

// ---------------------------------------------------------------- mask view
const BLOCK_COLORS = { s: "#eceef2", e: "#f6c28b", p: "#9cc0f0", f: "#1f4e9c" };
function renderMask(d) {
  const body = $("mask-body"); body.textContent = "";
  const figs = el("div", { class: "row" });
  if (d.pattern) {
    const cell = Math.max(1, Math.min(24, Math.floor(520 / Math.max(d.T, d.S))));
    const canvas = el("canvas", { width: d.S * cell + 2, height: d.T * cell + 2 });
    canvas.dataset.title = `T x S pattern (${d.T} x ${d.S}), blocks ${d.block_q} x ${d.block_k}`;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    d.pattern.forEach((row, i) => { for (let j = 0; j < d.S; j++) {
      const skipped = d.blocks[Math.floor(i / d.block_q)][Math.floor(j / d.block_k)] === "s";
      ctx.fillStyle = row[j] === "1" ? "#1f4e9c" : (skipped ? "#eceef2" : "#c9ccd4");
      ctx.fillRect(j * cell, i * cell, Math.max(1, cell - (cell > 3 ? 1 : 0)), Math.max(1, cell - (cell > 3 ? 1 : 0)));
    } });
    ctx.strokeStyle = "#e0771b"; ctx.lineWidth = 1;
    for (let i = 0; i <= d.T; i += d.block_q) { ctx.beginPath(); ctx.moveTo(0, i * cell + 0.5); ctx.lineTo(d.S * cell, i * cell + 0.5); ctx.stroke(); }
    for (let j = 0; j <= d.S; j += d.block_k) { ctx.beginPath(); ctx.moveTo(j * cell + 0.5, 0); ctx.lineTo(j * cell + 0.5, d.T * cell); ctx.stroke(); }
    hover(canvas, (x, y) => {
      const i = Math.floor(y / cell), j = Math.floor(x / cell);
      if (i < 0 || j < 0 || i >= d.T || j >= d.S) return null;
      const b = d.blocks[Math.floor(i / d.block_q)][Math.floor(j / d.block_k)];
      return `query ${i}, key ${j}: ${d.pattern[i][j] === "1" ? "may attend" : "masked"}\nblock: ${BLOCK_NAMES[b]}`;
    });
    figs.append(el("div", { class: "figure" }, el("h4", {}, canvas.dataset.title), canvas,
      el("div", { class: "caption" }, "blue: may attend; grey: masked; pale: in a block the chunked backend skips; orange lines: block edges")));
  } else {
    figs.append(el("p", { class: "hint" }, `The ${d.T} x ${d.S} pattern is too large to draw cell by cell; the block map shows it.`));
  }
  const nq = d.blocks.length, nk = d.blocks[0].length, bc = Math.max(2, Math.min(28, Math.floor(420 / Math.max(nq, nk))));
  const map = el("canvas", { width: nk * bc + 2, height: nq * bc + 2 });
  map.dataset.title = `block map (${nq} x ${nk} blocks)`;
  const mctx = map.getContext("2d");
  mctx.fillStyle = "#fff"; mctx.fillRect(0, 0, map.width, map.height);
  d.blocks.forEach((row, i) => [...row].forEach((b, j) => {
    mctx.fillStyle = BLOCK_COLORS[b]; mctx.fillRect(j * bc, i * bc, bc - 1, bc - 1); }));
  hover(map, (x, y) => {
    const i = Math.floor(y / bc), j = Math.floor(x / bc);
    if (i < 0 || j < 0 || i >= nq || j >= nk) return null;
    return `queries ${i * d.block_q}-${Math.min(d.T, (i + 1) * d.block_q) - 1}, keys ${j * d.block_k}-${Math.min(d.S, (j + 1) * d.block_k) - 1}: ${BLOCK_NAMES[d.blocks[i][j]]}`;
  });
  const counts = {}; d.blocks.join("").split("").forEach((b) => { counts[b] = (counts[b] || 0) + 1; });
  const legend = el("div", { class: "legend" });
  for (const b of "sepf") legend.append(el("span", { style: `background:${BLOCK_COLORS[b]}` }), `${BLOCK_NAMES[b]} (${counts[b] || 0})`);
  figs.append(el("div", { class: "figure" }, el("h4", {}, map.dataset.title), map, legend));
  const ex = d.explain;
  const lines = [`${d.arguments}`, "", `auto -> ${ex.chosen}: ${ex.reason}`,
                 ...Object.entries(ex.rejected).map(([n, why]) => `  not ${n}: ${why}`), "",
                 `${d.visible} of ${d.T * d.S} cells may attend`];
  figs.append(el("div", { class: "figure" }, el("h4", {}, "attnkit.explain(q, k, v, ...)"),
                 el("pre", { class: "explain", id: "explain-text" }, lines.join("\n"))));
  body.append(figs);
}
const BLOCK_NAMES = { s: "skipped by chunked", e: "computed, all masked", p: "partial", f: "full" };

function maskParams() {
  const num = (id) => Number($(id).value);
  return { T: num("mask-T"), S: num("mask-S"), causal: $("mask-causal").checked, align: $("mask-align").value,
           window: num("mask-window"), valid_keys: num("mask-valid"), documents: $("mask-docs").value.trim(),
           block_q: num("mask-bq"), block_k: num("mask-bk") };
}

// ---------------------------------------------------------------- translator view
function renderTranslate(d) {
  const body = $("translate-body"); body.textContent = "";
  body.append(el("p", {}, "answer: ", el("code", { id: "translate-answer" }, d.answer),
                 `  (source "${d.text.trim().toLowerCase()}"; rows: output characters, columns: source characters)`));
  d.weights.forEach((layer, l) => {
    const avg = layer[0].map((row, i) => row.map((_, j) => layer.reduce((a, hd) => a + hd[i][j], 0) / layer.length));
    const cell = Math.max(8, Math.min(14, Math.floor(240 / d.source.length)));
    const panels = layer.map((w, hd) => heatmap(`layer ${l} head ${hd}`, w, d.output, d.source, { cell, scale: 1,
      describe: (i, j, v) => `output ${i} '${d.output[i]}' <- source ${j} '${d.source[j]}': ${v.toFixed(4)}` }));
    panels.push(heatmap(`layer ${l} head average`, avg, d.output, d.source, { cell, scale: 1 }));
    body.append(el("div", { class: "row" }, ...panels));
  });
}

// ---------------------------------------------------------------- GPT view
function gptWeights(d) {
  const bytes = Uint8Array.from(atob(d.weights_u8), (ch) => ch.charCodeAt(0));
  const T = d.tokens.length;
  return (l, h, i, j) => bytes[((l * d.heads + h) * T + i) * T + j] / 255;
}
const HEAD_COLORS = ["#1f4e9c", "#c0392b", "#1e8449", "#b9770e", "#7d3c98", "#117a8b", "#a04000", "#34495e"];

function renderGPT(d) {
  const body = $("gpt-body"); body.textContent = "";
  const w = gptWeights(d), T = d.tokens.length;
  const layerSel = $("gpt-layer"), headSel = $("gpt-head");
  if (layerSel.options.length !== d.layers || headSel.options.length !== d.heads + 1) {
    layerSel.textContent = ""; headSel.textContent = "";
    for (let l = 0; l < d.layers; l++) layerSel.append(el("option", { value: l }, String(l)));
    for (let h = 0; h < d.heads; h++) headSel.append(el("option", { value: h }, String(h)));
    headSel.append(el("option", { value: "all" }, "all (one colour each)"));
  }
  const rh = Math.max(3, Math.min(18, 760 / T)), top = 46, width = 760;
  const canvas = el("canvas", { width, height: top + T * rh + 10, id: "head-view" });
  canvas.dataset.title = `head view: layer ${layerSel.value}, head ${headSel.value} (${T} tokens)`;
  const draw = (focus) => drawHeadView(canvas, d, w, rh, top, focus);
  draw(-1);
  canvas.addEventListener("mousemove", (e) => {
    const r = canvas.getBoundingClientRect(), y = (e.clientY - r.top) * canvas.height / r.height;
    const i = Math.floor((y - top) / rh);
    draw(i >= 0 && i < T ? i : -1);
  });
  canvas.addEventListener("mouseleave", () => draw(-1));
  body.append(el("p", { class: "hint" }, `${T} tokens of a context of ${d.context}; the model's next character: `,
                 el("code", {}, d.next), ". Lines join each query (left) to the keys it attends (right), " +
                 "thinned to the top-k keys above the threshold; hover a token to see only its lines (its top-k keys, whatever their weight)."),
              el("div", { class: "row" }, el("div", { class: "figure" }, el("h4", {}, canvas.dataset.title), canvas),
                 modelView(d, w)));
}

function drawHeadView(canvas, d, w, rh, top, focus) {
  const ctx = canvas.getContext("2d"), T = d.tokens.length, l = Number($("gpt-layer").value || 0);
  const headVal = $("gpt-head").value, heads = headVal === "all" || headVal === "" ? [...Array(d.heads).keys()] : [Number(headVal)];
  const threshold = Number($("gpt-threshold").value), topk = Math.max(1, Number($("gpt-topk").value) || 5);
  const xl = 150, xr = canvas.width - 150;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "bold 12px system-ui"; ctx.fillStyle = "#1d2433"; ctx.textAlign = "center";
  ctx.fillText("queries", xl - 50, 14); ctx.fillText("keys", xr + 50, 14);
  ctx.lineWidth = Math.max(0.6, Math.min(2, rh / 5));
  const focusKeys = [];
  for (const h of heads) {
    ctx.strokeStyle = HEAD_COLORS[h % HEAD_COLORS.length];
    for (let i = 0; i < T; i++) {
      if (focus >= 0 && i !== focus) continue;
      // A hovered token always shows its top-k keys, even in a diffuse head; the rest are
      // thinned by the threshold as well, so 200+ tokens stay readable.
      const row = [];
      for (let j = 0; j <= i; j++) { const v = w(l, h, i, j); if (focus >= 0 || v >= threshold) row.push([v, j]); }
      row.sort((a, b) => b[0] - a[0]);
      const top1 = row.length ? row[0][0] : 1;
      for (const [v, j] of row.slice(0, topk)) {
        if (focus >= 0) focusKeys.push([j, v]);
        ctx.globalAlpha = focus >= 0 ? 0.3 + 0.7 * v / Math.max(top1, 1e-6) : Math.min(1, 0.08 + 0.6 * v);
        ctx.beginPath(); ctx.moveTo(xl, top + (i + 0.5) * rh); ctx.lineTo(xr, top + (j + 0.5) * rh); ctx.stroke();
      }
    }
  }
  ctx.globalAlpha = 1;
  const every = rh >= 10 ? 1 : Math.ceil(10 / rh), size = Math.min(12, Math.max(8, rh - 1));
  ctx.font = `${size}px ui-monospace, monospace`; ctx.textBaseline = "middle";
  for (let i = 0; i < T; i++) {
    const near = focus >= 0 && i !== focus && Math.abs(i - focus) < every;  // keep it legible
    if (i !== focus && (i % every !== 0 || near)) continue;
    ctx.fillStyle = i === focus ? "#c0392b" : "#1d2433";
    const label = `${d.tokens[i]} ${i}`;
    ctx.textAlign = "right"; ctx.fillText(label, xl - 6, top + (i + 0.5) * rh);
    ctx.textAlign = "left"; ctx.fillText(`${i} ${d.tokens[i]}`, xr + 6, top + (i + 0.5) * rh);
  }
  for (const [j, v] of focusKeys) {  // the attended keys' labels, with their weights
    const y = top + (j + 0.5) * rh, text = `${j} ${d.tokens[j]}  ${v.toFixed(3)}`;
    ctx.fillStyle = "#fff"; ctx.fillRect(xr + 2, y - size / 2 - 1, ctx.measureText(text).width + 8, size + 2);
    ctx.fillStyle = "#c0392b"; ctx.textAlign = "left"; ctx.fillText(text, xr + 6, y);
  }
  if (focus >= 0) {
    const context = d.tokens.slice(Math.max(0, focus - 24), focus + 1).join("");
    ctx.fillStyle = "#c0392b"; ctx.textAlign = "left"; ctx.font = "12px ui-monospace, monospace";
    ctx.fillText(`query ${focus}: ...${context}`, 8, 34);
  }
}

// Layer x head thumbnails; click one to show it in the head view.
function modelView(d, w) {
  const T = d.tokens.length, size = Math.max(48, Math.min(120, Math.floor(520 / d.heads))), pad = 18;
  const canvas = el("canvas", { width: pad + d.heads * (size + 6), height: pad + d.layers * (size + 6), class: "clickable", id: "model-view" });
  canvas.dataset.title = `model view (${d.layers} layers x ${d.heads} heads)`;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui"; ctx.fillStyle = "#1d2433";
  for (let l = 0; l < d.layers; l++) for (let h = 0; h < d.heads; h++) {
    const img = ctx.createImageData(size, size), x0 = pad + h * (size + 6), y0 = pad + l * (size + 6);
    for (let py = 0; py < size; py++) for (let px = 0; px < size; px++) {
      const i0 = Math.floor(py * T / size), i1 = Math.max(i0 + 1, Math.floor((py + 1) * T / size));
      const j0 = Math.floor(px * T / size), j1 = Math.max(j0 + 1, Math.floor((px + 1) * T / size));
      let m = 0;
      for (let i = i0; i < i1; i++) for (let j = j0; j < j1; j++) m = Math.max(m, w(l, h, i, j));
      const a = Math.sqrt(m), o = 4 * (py * size + px);
      img.data[o] = 255 - a * 224; img.data[o + 1] = 255 - a * 177; img.data[o + 2] = 255 - a * 99; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, x0, y0);
    if (l === 0) ctx.fillText(`head ${h}`, x0, 12);
  }
  ctx.save(); for (let l = 0; l < d.layers; l++) { ctx.translate(0, 0); ctx.fillText(String(l), 4, pad + l * (size + 6) + size / 2); } ctx.restore();
  const pick = (e) => {
    const r = canvas.getBoundingClientRect();
    const h = Math.floor(((e.clientX - r.left) * canvas.width / r.width - pad) / (size + 6));
    const l = Math.floor(((e.clientY - r.top) * canvas.height / r.height - pad) / (size + 6));
    return l >= 0 && h >= 0 && l < d.layers && h < d.heads ? [l, h] : null;
  };
  canvas.addEventListener("click", (e) => { const p = pick(e); if (!p) return;
    $("gpt-layer").value = p[0]; $("gpt-head").value = p[1]; renderGPT(d); });
  hover(canvas, () => null);
  return el("div", { class: "figure" }, el("h4", {}, canvas.dataset.title), canvas,
            el("div", { class: "caption" }, "rows: layers, columns: heads; each thumbnail is queries x keys (square root of the largest weight per pixel). Click one to open it in the head view."));
}

// ---------------------------------------------------------------- PNG export
function exportPNG(view) {
  const canvases = [...document.querySelectorAll(`#view-${view} canvas`)];
  if (!canvases.length) throw new Error("nothing to save yet in this view");
  const gap = 26, width = Math.max(...canvases.map((c) => c.width)) + 20;
  const height = 40 + canvases.reduce((a, c) => a + c.height + gap, 0);
  const out = el("canvas", { width, height }), ctx = out.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
  ctx.fillStyle = "#1d2433"; ctx.font = "bold 15px system-ui";
  ctx.fillText(`attnkit explore: ${view}`, 10, 22);
  let y = 40;
  ctx.font = "12px ui-monospace, monospace";
  for (const c of canvases) { ctx.fillText(c.dataset.title || "", 10, y + 12); ctx.drawImage(c, 10, y + 18); y += c.height + gap; }
  return out.toDataURL("image/png");
}
state.exportPNG = exportPNG;

// ---------------------------------------------------------------- wiring
const VIEWS = {
  tutorial: { render: renderTutorial, params: () => ({ sentence: $("sentence").value }) },
  mask: { render: renderMask, params: maskParams },
  translate: { render: renderTranslate, params: () => ({ text: $("date").value }) },
  gpt: { render: renderGPT, params: () => ({ prompt: $("prompt").value }) },
};

async function update(view, first) {
  const v = VIEWS[view];
  try {
    const data = await api(view, first && OFFLINE ? null : v.params());
    state.data[view] = data; showError(view, null); v.render(data);
  } catch (err) { showError(view, err); }
  state.pending -= 1;  // the tests wait for 0
}

function select(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const name of Object.keys(VIEWS)) $("view-" + name).hidden = name !== view;
  if (!state.data[view] && !state.loaded[view]) { state.loaded[view] = true; state.pending += 1; update(view, true); }
  if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
}

function init() {
  state.loaded = {};
  $("prompt").value = DEFAULT_PROMPT;
  if (OFFLINE) $("offline-note").hidden = false;
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => select(tab.dataset.view));
  for (const view of Object.keys(VIEWS)) {
    $(view + "-form").addEventListener("submit", (e) => { e.preventDefault(); state.pending += 1; update(view, false); });
  }
  for (const b of document.querySelectorAll(".save-png")) b.addEventListener("click", () => {
    try {
      const a = el("a", { href: exportPNG(b.dataset.view), download: `attnkit-${b.dataset.view}.png` });
      document.body.append(a); a.click(); a.remove();
    } catch (err) { showError(b.dataset.view, err); }
  });
  for (const id of ["gpt-layer", "gpt-head", "gpt-topk"]) $(id).addEventListener("change", () => state.data.gpt && renderGPT(state.data.gpt));
  $("gpt-threshold").addEventListener("input", () => {
    $("gpt-threshold-value").textContent = Number($("gpt-threshold").value).toFixed(2);
    if (state.data.gpt) renderGPT(state.data.gpt);
  });
  window.addEventListener("hashchange", () => { const v = location.hash.slice(1); if (VIEWS[v] && v !== state.view) select(v); });
  const start = location.hash.slice(1);
  select(VIEWS[start] ? start : "tutorial");
}
init();
