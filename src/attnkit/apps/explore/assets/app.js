// attnkit explore, part 4 of 4: PNG export and wiring (tabs, forms, first load).

// ---------------------------------------------------------------- PNG export
function exportPNG(view) {
  const canvases = [...root.querySelectorAll(`#view-${view} canvas`)];
  if (!canvases.length) throw new Error(L("explore.nothing_to_save"));
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
  for (const tab of root.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const name of Object.keys(VIEWS)) $("view-" + name).hidden = name !== view;
  if (!state.data[view] && !state.loaded[view]) { state.loaded[view] = true; state.pending += 1; update(view, true); }
  if (options.page && location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
}
state.select = select;

// Switch the language: the fixed texts, then every view drawn so far.
function setLanguage(lang) {
  state.lang = I18N[lang] ? lang : "en";
  if (options.page) try { localStorage.setItem("attnkit.lang", state.lang); } catch (err) { /* file: pages */ }
  $("lang").value = state.lang;
  applyLanguage();
  for (const [view, data] of Object.entries(state.data)) VIEWS[view].render(data);
}
state.setLanguage = setLanguage;

// The form fields of a view, set from its choices (the inverse of VIEWS[view].params()).
function fillForm(view, p) {
  if (!p) return;
  const set = (id, v) => { if (v !== undefined && v !== null) { const n = $(id); if (n.type === "checkbox") n.checked = !!v; else n.value = String(v); } };
  if (view === "tutorial") set("sentence", p.sentence);
  if (view === "translate") set("date", p.text);
  if (view === "gpt") set("prompt", p.prompt);
  if (view === "mask") {
    const ids = { T: "mask-T", S: "mask-S", align: "mask-align", causal: "mask-causal", causal_offset: "mask-offset",
                  window_on: "mask-window-on", window_left: "mask-left", window_right: "mask-right", prefix: "mask-prefix",
                  chunk: "mask-chunk", documents: "mask-docs", combine: "mask-combine", valid_keys: "mask-valid",
                  block_q: "mask-bq", block_k: "mask-bk" };
    for (const [name, id] of Object.entries(ids)) set(id, Array.isArray(p[name]) ? p[name].join(",") : p[name]);
    if (p.S === undefined && p.T !== undefined) set("mask-S", p.T);
  }
}

// New data for some views (a notebook widget's kernel sent it): fill their forms, draw them.
function refresh(data, params) {
  for (const [view, d] of Object.entries(data || {})) {
    if (!VIEWS[view] || d === state.data[view]) continue;
    fillForm(view, (params || {})[view]);
    if (d.error) { showError(view, new Error((d.errors || {})[state.lang] || d.error)); continue; }
    state.data[view] = d; showError(view, null); VIEWS[view].render(d);
  }
}
state.refresh = refresh;

function init() {
  state.loaded = {};
  for (const option of [...$("lang").options]) if (!I18N[option.value]) option.remove();
  $("lang").value = state.lang;
  applyLanguage();
  $("lang").addEventListener("change", () => setLanguage($("lang").value));
  $("prompt").value = DEFAULT_PROMPT;
  if (OFFLINE) $("offline-note").hidden = false;
  if (!options.page && !options.request) {  // a notebook widget's static copy: no kernel
    $("offline-note").dataset.i18n = "explore.static_note"; $("offline-note").textContent = L("explore.static_note");
    $("offline-note").hidden = false;
  }
  const shown = options.views || Object.keys(VIEWS);
  for (const tab of root.querySelectorAll(".tab")) {
    tab.hidden = !shown.includes(tab.dataset.view);
    tab.addEventListener("click", () => select(tab.dataset.view));
  }
  if (shown.length === 1) root.querySelector("nav").hidden = true;
  for (const view of shown) fillForm(view, (options.params || {})[view]);
  refresh(options.initial, null);
  for (const view of Object.keys(VIEWS)) {
    $(view + "-form").addEventListener("submit", (e) => { e.preventDefault(); state.pending += 1; update(view, false); });
  }
  for (const b of root.querySelectorAll(".save-png")) b.addEventListener("click", () => {
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
  if (options.page) {
    window.addEventListener("hashchange", () => { const v = location.hash.slice(1); if (VIEWS[v] && v !== state.view) select(v); });
    const start = location.hash.slice(1);
    select(VIEWS[start] ? start : "tutorial");
  } else {
    select(shown.includes(options.view) ? options.view : shown[0]);
  }
}
init();
