// attnkit explore, part 2 of 4: the tutorial and mask views (uses core.js).

// ---------------------------------------------------------------- tutorial view
const DIMS = ["d0", "d1", "d2"], OUT = ["out0", "out1"];

function renderTutorial(d) {
  const body = $("tutorial-body"); body.textContent = "";
  const T = d.tokens.length, q = Math.min(state.query, T - 1), n = q + 1, tok = d.tokens;
  const add = (...nodes) => body.append(...nodes);
  const picker = el("div", { class: "tokens" }, L("explore.tutorial.query") + " ");
  tok.forEach((t, i) => {
    const b = el("button", { type: "button", class: i === q ? "selected" : "" }, t);
    b.addEventListener("click", () => { state.query = i; renderTutorial(d); });
    picker.append(b);
  });
  const s = d.simple, tr = d.trainable, c = d.causal, h = d.heads;
  add(el("h2", {}, L("walkthrough.section.3.3.1")), picker,
      el("div", { class: "row" }, heatmap("inputs", d.inputs, tok, DIMS),
         heatmap(`attn_scores_${n} = inputs @ inputs[${q}]`, s.attn_scores.map((r) => [r[q]]), tok, [tok[q]],
                 { describe: (i, j, v) => `x(${i + 1}) . x(${n}) = ${v.toFixed(6)}` }),
         heatmap(`attn_weights_${n} = softmax`, s.attn_weights[q].map((v) => [v]), tok, [tok[q]], { scale: 1 }),
         heatmap(`context_vec_${n}`, [s.context_vecs[q]], [tok[q]], DIMS)),
      vecLine("simple.attn_scores.q", `attn_scores_${n}` + L("explore.tutorial.query_of", { token: tok[q] }), s.attn_scores[q]),
      vecLine("simple.attn_weights.q", `attn_weights_${n} (softmax)`, s.attn_weights[q]),
      vecLine("simple.context_vec.q", `context_vec_${n} = z(${n})`, s.context_vecs[q]));
  add(el("h2", {}, L("walkthrough.section.3.3.2")),
      el("div", { class: "row" }, heatmap("attn_scores = inputs @ inputs.T", s.attn_scores, tok, tok, { rotate: true }),
         heatmap("attn_weights = softmax(attn_scores, dim=-1)", s.attn_weights, tok, tok, { rotate: true, scale: 1 }),
         heatmap("all_context_vecs = attn_weights @ inputs", s.context_vecs, tok, DIMS)));
  add(el("h2", {}, L("walkthrough.section.3.4.1", { seed: tr.seed_v1, d_out: 2 })),
      el("div", { class: "row" }, heatmap("W_query", tr.W_query, DIMS, OUT), heatmap("W_key", tr.W_key, DIMS, OUT),
         heatmap("W_value", tr.W_value, DIMS, OUT), heatmap("queries", tr.queries, tok, OUT),
         heatmap("keys", tr.keys, tok, OUT), heatmap("values", tr.values, tok, OUT)),
      el("div", { class: "row" }, heatmap("attn_scores = queries @ keys.T", tr.attn_scores, tok, tok, { rotate: true }),
         heatmap(`attn_weights = softmax(attn_scores / sqrt(${tr.d_k}))`, tr.attn_weights, tok, tok, { rotate: true, scale: 1 }),
         heatmap("context_vecs = attn_weights @ values", tr.context_vecs, tok, OUT)),
      vecLine("trainable.query.q", `query_${n}`, tr.queries[q]),
      vecLine("trainable.attn_scores.q", `attn_scores_${n}`, tr.attn_scores[q]),
      vecLine("trainable.attn_weights.q", `attn_weights_${n}` + L("explore.tutorial.scaled", { d_k: 2 }), tr.attn_weights[q]),
      vecLine("trainable.context_vec.q", `context_vec_${n}`, tr.context_vecs[q]));
  add(el("h2", {}, L("walkthrough.section.3.4.2")),
      el("div", { class: "row" }, heatmap(`SelfAttentionV1(3, 2), seed ${tr.seed_v1}`, tr.context_vecs, tok, OUT),
         heatmap(`SelfAttentionV2(3, 2), seed ${tr.seed_v2}`, tr.sa_v2, tok, OUT)));
  const small = T <= 8 ? { cell: 30 } : {};  // both methods fit side by side
  add(el("h2", {}, L("walkthrough.section.3.5.1") + L("explore.tutorial.side_by_side")),
      el("div", { class: "row" },
         el("div", { class: "side" }, el("b", {}, L("explore.tutorial.method1")),
            el("div", { class: "row" }, heatmap("attn_weights", c.attn_weights, tok, tok, { ...small, rotate: true, scale: 1 }),
               heatmap("mask_simple = tril(ones)", c.mask_simple, tok, tok, { ...small, rotate: true, scale: 1 }),
               heatmap("masked_simple_norm", c.masked_simple_norm, tok, tok, { ...small, rotate: true, scale: 1 }))),
         el("div", { class: "side" }, el("b", {}, L("explore.tutorial.method2")),
            el("div", { class: "row" }, heatmap(L("walkthrough.masked"), c.masked_scores, tok, tok, { ...small, rotate: true }),
               heatmap("attn_weights = softmax(masked / sqrt(d_k))", c.causal_weights, tok, tok, { ...small, rotate: true, scale: 1 })))),
      el("p", { "data-key": "causal.agree" }, L("explore.tutorial.agree", { gap: c.max_difference.toExponential(1) })));
  const toggle = el("input", { type: "checkbox", id: "training" });
  toggle.checked = state.training;
  toggle.addEventListener("change", () => { state.training = toggle.checked; renderTutorial(d); });
  const shown = state.training ? c.dropped : c.causal_weights;
  add(el("h2", {}, L("walkthrough.section.3.5.2", { p: c.dropout_p, seed: c.dropout_seed })),
      el("label", {}, toggle, " " + L("explore.tutorial.training_mode")),
      el("div", { class: "row" }, heatmap(state.training ? L("explore.tutorial.dropped") : L("explore.tutorial.eval"),
                                        shown, tok, tok, { rotate: true, scale: 2 })));
  const H = h.num_heads, headFig = (name, w, i) => heatmap(L("explore.tutorial.head", { name, i }), w[i], tok, tok, { rotate: true, scale: 1, cell: 24 });
  add(el("h2", {}, L("explore.tutorial.heads_title", { seed: h.seed, heads: H })),
      el("div", { class: "row" }, heatmap("CausalAttention(3, 2, T, 0.0)", h.ca, tok, OUT)),
      el("div", { class: "row" },
         el("div", { class: "side" }, el("b", {}, L("explore.tutorial.wrapper")),
            el("div", { class: "row" }, ...[...Array(H).keys()].map((i) => headFig("wrapper", h.wrapper_weights, i)),
               heatmap("output (T, num_heads * d_out)", h.wrapper, tok, ["h0:0", "h0:1", "h1:0", "h1:1"]))),
         el("div", { class: "side" }, el("b", {}, L("explore.tutorial.mha")),
            el("div", { class: "row" }, ...[...Array(H).keys()].map((i) => headFig("mha", h.mha_weights, i)),
               heatmap("output (T, d_out)", h.mha, tok, OUT)))));
  if (d.checks.length) {
    const table = el("table", { class: "checks" }, el("tr", {}, el("th", {}, L("explore.checks.value")), el("th", {}, L("explore.checks.published")),
                     el("th", {}, L("explore.checks.page")), el("th", {}, "")));
    for (const ck of d.checks) table.append(el("tr", {}, el("td", {}, ck.name), el("td", {}, vecText(ck.published)),
      el("td", {}, vecText(ck.got)), el("td", { class: ck.ok ? "ok" : "bad" }, ck.ok ? L("explore.checks.ok") : L("explore.checks.bad"))));
    add(el("h2", {}, L("explore.checks.title")), table);
  }
}

// ---------------------------------------------------------------- mask view
// The block map is the engine's BlockSummary at chunked's granularity (block_q x tile_k):
// s = skipped (empty), f = full (no mask), p = partial (masked), e = planned partial but
// every cell masked (the interval arithmetic could not prove it empty).
const BLOCK_COLORS = { s: "#eceef2", e: "#f6c28b", p: "#9cc0f0", f: "#1f4e9c" };
function tileOf(d, i, j) { return d.blocks[Math.floor(i / d.block_q)][Math.floor(j / d.tile_k)]; }

function renderMask(d) {
  const body = $("mask-body"); body.textContent = "";
  const figs = el("div", { class: "row" });
  if (d.pattern) {
    const cell = Math.max(1, Math.min(24, Math.floor(520 / Math.max(d.T, d.S))));
    const canvas = el("canvas", { width: d.S * cell + 2, height: d.T * cell + 2 });
    canvas.dataset.title = L("explore.mask.pattern_title", { T: d.T, S: d.S, block_q: d.block_q, block_k: d.tile_k });
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    d.pattern.forEach((row, i) => { for (let j = 0; j < d.S; j++) {
      ctx.fillStyle = row[j] === "1" ? "#1f4e9c" : (tileOf(d, i, j) === "s" ? "#eceef2" : "#c9ccd4");
      ctx.fillRect(j * cell, i * cell, Math.max(1, cell - (cell > 3 ? 1 : 0)), Math.max(1, cell - (cell > 3 ? 1 : 0)));
    } });
    ctx.strokeStyle = "#e0771b"; ctx.lineWidth = 1;
    for (let i = 0; i <= d.T; i += d.block_q) { ctx.beginPath(); ctx.moveTo(0, i * cell + 0.5); ctx.lineTo(d.S * cell, i * cell + 0.5); ctx.stroke(); }
    for (let j = 0; j <= d.S; j += d.tile_k) { ctx.beginPath(); ctx.moveTo(j * cell + 0.5, 0); ctx.lineTo(j * cell + 0.5, d.T * cell); ctx.stroke(); }
    hover(canvas, (x, y) => {
      const i = Math.floor(y / cell), j = Math.floor(x / cell);
      if (i < 0 || j < 0 || i >= d.T || j >= d.S) return null;
      return L("explore.mask.cell", { i, j, what: L(d.pattern[i][j] === "1" ? "explore.mask.may_attend" : "explore.mask.masked"),
                                       block: L("explore.block." + tileOf(d, i, j)) });
    });
    figs.append(el("div", { class: "figure" }, el("h4", {}, canvas.dataset.title), canvas,
      el("div", { class: "caption" }, L("explore.mask.caption"))));
  } else {
    figs.append(el("p", { class: "hint" }, L("explore.mask.too_large", { T: d.T, S: d.S })));
  }
  const nq = d.blocks.length, nk = d.blocks[0].length, bc = Math.max(2, Math.min(28, Math.floor(420 / Math.max(nq, nk))));
  const map = el("canvas", { width: nk * bc + 2, height: nq * bc + 2, id: "block-map" });
  map.dataset.title = L("explore.mask.block_map", { nq, nk });
  const mctx = map.getContext("2d");
  mctx.fillStyle = "#fff"; mctx.fillRect(0, 0, map.width, map.height);
  d.blocks.forEach((row, i) => [...row].forEach((b, j) => {
    mctx.fillStyle = BLOCK_COLORS[b]; mctx.fillRect(j * bc, i * bc, bc - 1, bc - 1); }));
  hover(map, (x, y) => {
    const i = Math.floor(y / bc), j = Math.floor(x / bc);
    if (i < 0 || j < 0 || i >= nq || j >= nk) return null;
    return L("explore.mask.block", { q0: i * d.block_q, q1: Math.min(d.T, (i + 1) * d.block_q) - 1, k0: j * d.tile_k,
                                     k1: Math.min(d.S, (j + 1) * d.tile_k) - 1, what: L("explore.block." + d.blocks[i][j]) });
  });
  const counts = {}; d.blocks.join("").split("").forEach((b) => { counts[b] = (counts[b] || 0) + 1; });
  const legend = el("div", { class: "legend" });
  for (const b of "sfpe") legend.append(el("span", { style: `background:${BLOCK_COLORS[b]}` }), `${L("explore.block." + b)} (${counts[b] || 0})`);
  figs.append(el("div", { class: "figure" }, el("h4", {}, map.dataset.title), map, legend,
    el("div", { class: "caption" }, L("explore.mask.plan", { visited: (100 * d.visited_fraction).toFixed(1), blocks: d.key_blocks,
                                                             masked: d.masked_key_blocks, block_k: d.block_k }))));
  const ex = d.explain;
  const lines = [d.arguments, "", L("explore.mask.describe", { text: d.describe }), "", `auto -> ${ex.chosen}: ${ex.reason}`,
                 ...Object.entries(ex.rejected).map(([n, why]) => `  not ${n}: ${why}`), "",
                 L("explore.mask.visible", { visible: d.visible, cells: d.T * d.S })];
  figs.append(el("div", { class: "figure" }, el("h4", {}, "attnkit.explain(q, k, v, mask_mod=...)"),
                 el("pre", { class: "explain", id: "explain-text" }, lines.join("\n"))));
  body.append(figs);
}

function maskParams() {
  const num = (id) => Number($(id).value), text = (id) => $(id).value.trim();
  return { T: num("mask-T"), S: num("mask-S"), align: $("mask-align").value, causal: $("mask-causal").checked,
           causal_offset: text("mask-offset"), window_on: $("mask-window-on").checked, window_left: text("mask-left"),
           window_right: text("mask-right"), prefix: num("mask-prefix"), chunk: num("mask-chunk"),
           documents: text("mask-docs"), combine: $("mask-combine").value, valid_keys: num("mask-valid"),
           block_q: num("mask-bq"), block_k: num("mask-bk") };
}
