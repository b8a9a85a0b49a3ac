// attnkit explore, part 3 of 4: the translator and GPT views (uses core.js).

// ---------------------------------------------------------------- translator view
function renderTranslate(d) {
  const body = $("translate-body"); body.textContent = "";
  body.append(el("p", {}, L("explore.translate.answer") + " ", d.answer === null
                   ? el("code", { id: "translate-answer", class: "refused" }, L("explore.translate.refused", { why: d.refused }))
                   : el("code", { id: "translate-answer" }, d.answer),
                 "  " + L("explore.translate.axes", { source: d.text.trim().toLowerCase() })));
  d.weights.forEach((layer, l) => {
    const avg = layer[0].map((row, i) => row.map((_, j) => layer.reduce((a, hd) => a + hd[i][j], 0) / layer.length));
    const cell = Math.max(8, Math.min(14, Math.floor(240 / d.source.length)));
    const panels = layer.map((w, hd) => heatmap(L("explore.translate.panel", { l, h: hd }), w, d.output, d.source, { cell, scale: 1,
      describe: (i, j, v) => L("explore.translate.cell", { i, out: d.output[i], j, src: d.source[j], v: v.toFixed(4) }) }));
    panels.push(heatmap(L("explore.translate.average", { l }), avg, d.output, d.source, { cell, scale: 1 }));
    body.append(el("div", { class: "row" }, ...panels));
  });
}

// ---------------------------------------------------------------- GPT view
// Also the head and model views of any weights a notebook passes (attnkit.widgets.heads):
// then d has no prompt (the form is hidden), may name its layers and heads (layer_labels,
// head_labels) and may be non-causal (causal: false, every key drawn).
const layerName = (d, l) => (d.layer_labels ? d.layer_labels[l] : String(l));
const headName = (d, h) => (d.head_labels ? d.head_labels[h] : String(h));

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
    for (let l = 0; l < d.layers; l++) layerSel.append(el("option", { value: l }, layerName(d, l)));
    for (let h = 0; h < d.heads; h++) headSel.append(el("option", { value: h }, headName(d, h)));
    headSel.append(el("option", { value: "all" }, L("explore.gpt.all_heads")));
  }
  const rh = Math.max(3, Math.min(18, 760 / T)), top = 46, width = 760;
  const canvas = el("canvas", { width, height: top + T * rh + 10, id: "head-view" });
  // Weights from a notebook (no prompt): no prompt to type, the PNG button stays.
  for (const n of $("gpt-form").querySelectorAll("label, button[type=submit]")) n.hidden = d.prompt === undefined;
  const hv = headSel.value;
  canvas.dataset.title = L("explore.gpt.head_view", { l: layerName(d, Number(layerSel.value)),
                                                      h: hv === "all" ? hv : headName(d, Number(hv)), T });
  const draw = (focus) => drawHeadView(canvas, d, w, rh, top, focus);
  draw(-1);
  canvas.addEventListener("mousemove", (e) => {
    const r = canvas.getBoundingClientRect(), y = (e.clientY - r.top) * canvas.height / r.height;
    const i = Math.floor((y - top) / rh);
    draw(i >= 0 && i < T ? i : -1);
  });
  canvas.addEventListener("mouseleave", () => draw(-1));
  const about = d.next === undefined ? [L("explore.gpt.weights", { T, layers: d.layers, heads: d.heads })]
    : [L("explore.gpt.tokens", { T, context: d.context }) + " ", el("code", {}, d.next)];
  body.append(el("p", { class: "hint" }, ...about, L("explore.gpt.lines")),
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
  ctx.fillText(L("explore.gpt.queries"), xl - 50, 14); ctx.fillText(L("explore.gpt.keys"), xr + 50, 14);
  ctx.lineWidth = Math.max(0.6, Math.min(2, rh / 5));
  const focusKeys = [];
  for (const h of heads) {
    ctx.strokeStyle = HEAD_COLORS[h % HEAD_COLORS.length];
    for (let i = 0; i < T; i++) {
      if (focus >= 0 && i !== focus) continue;
      // A hovered token always shows its top-k keys, even in a diffuse head; the rest are
      // thinned by the threshold as well, so 200+ tokens stay readable.
      const row = [];
      const last = d.causal === false ? T - 1 : i;  // a causal head never looks ahead
      for (let j = 0; j <= last; j++) { const v = w(l, h, i, j); if (focus >= 0 || v >= threshold) row.push([v, j]); }
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
    ctx.fillText(L("explore.gpt.focus", { i: focus, context }), 8, 34);
  }
}

// Layer x head thumbnails; click one to show it in the head view.
function modelView(d, w) {
  const T = d.tokens.length, size = Math.max(48, Math.min(120, Math.floor(520 / d.heads))), pad = 18;
  const canvas = el("canvas", { width: pad + d.heads * (size + 6), height: pad + d.layers * (size + 6), class: "clickable", id: "model-view" });
  canvas.dataset.title = L("explore.gpt.model_view", { layers: d.layers, heads: d.heads });
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
    if (l === 0) ctx.fillText(L("explore.gpt.head_n", { h: headName(d, h) }), x0, 12);
  }
  for (let l = 0; l < d.layers; l++) ctx.fillText(layerName(d, l), 2, pad + l * (size + 6) + size / 2);
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
            el("div", { class: "caption" }, L("explore.gpt.model_caption")));
}
