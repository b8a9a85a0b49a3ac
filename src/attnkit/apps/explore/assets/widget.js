// attnkit's notebook widget: the explorer (attnkitExplorer, the same code as the page's) drawn
// in a shadow root inside a notebook cell, so its styles and element ids stay its own.
// mount() is also what a widget's static HTML copy runs (no kernel: no request function).
// ATTNKIT_I18N, ATTNKIT_CSS and ATTNKIT_MARKUP are set before this file (scripts.py).

function mount(el, options) {
  const host = document.createElement("div");
  host.className = "attnkit-widget";
  el.append(host);
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `<style>${ATTNKIT_CSS}</style><div class="attnkit-root">${ATTNKIT_MARKUP}</div>`;
  const state = attnkitExplorer(root, { i18n: ATTNKIT_I18N, ...options });
  host.attnkit = state;  // the tests (and a curious user) reach the state through the element
  return state;
}

// anywidget's entry point: the kernel computes the views (custom messages), the model keeps
// the last data and choices, so a saved notebook shows them again.
function render({ model, el }) {
  let next = 0;
  const waiting = new Map();
  let state = null;
  const onMessage = (msg) => {
    if (msg.type === "response" && waiting.has(msg.id)) {
      const { resolve, reject, timer } = waiting.get(msg.id);
      waiting.delete(msg.id); clearTimeout(timer);
      if (msg.error) reject(new Error(msg.error)); else resolve(model.get("data")[msg.view]);
    } else if (msg.type === "export") {  // Widget.save_png(): send the view's PNG back
      try { model.send({ type: "png", id: msg.id, view: msg.view, data: state.exportPNG(msg.view) }); }
      catch (err) { model.send({ type: "png", id: msg.id, view: msg.view, error: String(err.message || err) }); }
    }
  };
  model.on("msg:custom", onMessage);
  const request = (view, params, lang) => new Promise((resolve, reject) => {
    const id = ++next;
    const timer = setTimeout(() => { waiting.delete(id); reject(new Error(ATTNKIT_I18N[lang]["explore.no_kernel"])); }, 120000);
    waiting.set(id, { resolve, reject, timer });
    model.send({ type: "request", id, view, params, lang });
  });
  state = mount(el, { request, lang: model.get("language"), views: model.get("views"),
                      view: model.get("view"), initial: model.get("data"), params: model.get("params") });
  const onData = () => state.refresh(model.get("data"), model.get("params"));
  model.on("change:data", onData);
  return () => { model.off("msg:custom", onMessage); model.off("change:data", onData); };
}
