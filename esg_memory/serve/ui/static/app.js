// esg-memory edit debugger: plain JavaScript over the service's public HTTP API (no framework, no CDN).
// Every string from the server is inserted with textContent / createTextNode, never as HTML.
// The bearer token lives in this tab only (sessionStorage), is sent as an Authorization header (never a
// cookie), and is needed for writes, and for reads when the server protects them.
"use strict";

(() => {
  const TOKEN_KEY = "esg-memory-token";
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || null,
    readOnly: true,
    edits: [],
    selected: null,
    images: new Map(), // "id:sha" -> object URL
    probe: null, // the last probe: {prompt, image (data URI) | null, routed}
    probes: [], // recent probes for the scope map
    auditOnly: false, // an audit-only server (esg-memory ui --eval DIR, no memory)
    audit: null, // {reply, method, protocol, local: null | {results, lines, files}} (the Audit view)
  };
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM helpers (text only)
  function el(tag, opts, ...children) {
    const e = document.createElement(tag);
    const o = opts || {};
    if (o.cls) e.className = o.cls;
    if (o.text !== undefined && o.text !== null) e.textContent = String(o.text);
    if (o.title) e.title = String(o.title);
    if (o.id) e.id = o.id;
    for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function num(x, digits = 4) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  function signed(x) { return x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + Number(x).toFixed(4); }

  function status(text, isError) {
    const s = $("status");
    s.textContent = text || "";
    s.className = "status" + (isError ? " error" : "");
  }

  // ------------------------------------------------------------------ API
  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  function headers(json) {
    const h = {};
    if (state.token) h.Authorization = "Bearer " + state.token;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async function api(path, opts) {
    const o = opts || {};
    const init = { method: o.method || "GET", headers: headers(o.json !== undefined), credentials: "omit",
      cache: "no-store" };
    if (o.json !== undefined) init.body = JSON.stringify(o.json);
    const r = await fetch(path, init);
    const type = r.headers.get("content-type") || "";
    const body = type.includes("json") ? await r.json() : await r.blob();
    if (!r.ok) {
      let detail = body && body.detail !== undefined ? body.detail : r.statusText;
      if (typeof detail !== "string") detail = JSON.stringify(detail);
      if (r.status === 401) detail += " (enter the bearer token above)";
      throw new ApiError(r.status, detail);
    }
    return body;
  }

  function failed(e) { status(e instanceof ApiError ? `${e.status}: ${e.message}` : String(e), true); }

  function readFile(input) {
    const f = input.files && input.files[0];
    if (!f) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      const fr = new FileReader();
      fr.onload = () => resolve(String(fr.result));
      fr.onerror = () => reject(fr.error);
      fr.readAsDataURL(f);
    });
  }

  async function editImage(edit) {
    if (!edit.image) return null;
    const key = `${edit.id}:${edit.image}`;
    if (!state.images.has(key)) {
      const blob = await api(`/edits/${edit.id}/image`);
      state.images.set(key, URL.createObjectURL(blob));
    }
    return state.images.get(key);
  }

  function fillImage(img, edit) {
    editImage(edit).then((url) => { if (url) img.src = url; }).catch(() => { img.alt = "image unavailable"; });
  }

  // ------------------------------------------------------------------ mode and token
  function setMode() {
    document.body.classList.toggle("can-write", !state.readOnly);
    $("mode").textContent = (state.readOnly ? "read-only server" : "writable server") +
      (state.token ? " · token set" : " · no token");
  }

  async function start() {
    for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => show(b.dataset.view));
    $("token-set").addEventListener("click", () => {
      const v = $("token").value.trim();
      state.token = v || null;
      if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY);
      $("token").value = "";
      setMode();
      if (state.auditOnly) loadAudit(); else loadEdits();
    });
    $("token-clear").addEventListener("click", () => {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      setMode();
    });
    $("filter").addEventListener("input", renderTable);
    $("state-filter").addEventListener("change", renderTable);
    $("refresh").addEventListener("click", loadEdits);
    $("add-form").addEventListener("submit", (ev) => { ev.preventDefault(); addEdit(); });
    $("probe-form").addEventListener("submit", (ev) => { ev.preventDefault(); runProbe(); });
    $("wrong").addEventListener("click", openFeedback);
    $("feedback-send").addEventListener("click", sendFeedback);
    $("map-refresh").addEventListener("click", drawMap);
    $("audit-method").addEventListener("change", () => loadAudit($("audit-method").value, $("audit-protocol").value));
    $("audit-protocol").addEventListener("change", () => loadAudit($("audit-method").value, $("audit-protocol").value));
    $("audit-label").addEventListener("change", renderAuditRows);
    $("audit-dir").addEventListener("change", openLocalRun);
    try {
      const h = await api("/health");
      state.readOnly = !!h.read_only;
      state.auditOnly = !!h.audit_only;
    } catch (e) { failed(e); }
    setMode();
    if (state.auditOnly) {
      for (const v of ["edits", "probe", "map"]) $("tab-" + v).hidden = true;
      show("audit");
      return;
    }
    show("edits");
    await loadEdits();
  }

  function show(view) {
    for (const v of VIEWS) {
      $("view-" + v).hidden = v !== view;
      $("tab-" + v).classList.toggle("active", v === view);
    }
    if (view === "map") drawMap();
    if (view === "audit" && !state.audit) loadAudit();
  }
  const VIEWS = ["edits", "probe", "map", "audit"];

  // ------------------------------------------------------------------ edits
  function stateOf(e) {
    const tuned = e.tuning === "done" ? "tuned" : e.tuning === "none" ? "compiled" : (e.tuning || "?");
    const gives = e.gives_answer === true ? "gives" : e.gives_answer === false ? "fails" : "unchecked";
    return { tuned, gives };
  }

  function badges(e) {
    const s = stateOf(e);
    const span = el("span");
    span.append(el("span", { cls: "badge" + (s.tuned === "failed" ? " bad" : ""), text: s.tuned }));
    const label = { gives: "gives answer", fails: "wrong answer", unchecked: "not checked" }[s.gives];
    span.append(el("span", { cls: "badge" + (s.gives === "gives" ? " good" : s.gives === "fails" ? " bad" : ""),
      text: label }));
    return span;
  }

  async function loadEdits() {
    try {
      const all = [];
      for (let offset = 0; ; offset += 1000) {
        const page = await api(`/edits?offset=${offset}&limit=1000`);
        all.push(...page.edits);
        if (all.length >= page.total || page.edits.length === 0) break;
      }
      state.edits = all;
      renderTable();
      if (state.selected !== null) {
        if (all.some((e) => e.id === state.selected)) await selectEdit(state.selected);
        else { state.selected = null; clear($("detail")).append(el("p", { cls: "muted", text: "Select an edit." })); }
      }
      refreshFeedbackChoices();
    } catch (e) { failed(e); }
  }

  function matches(e, text, want) {
    if (want) {
      const s = stateOf(e);
      if (want === "tuned" || want === "compiled") { if (s.tuned !== want) return false; }
      else if (s.gives !== want) return false;
    }
    if (!text) return true;
    const hay = [e.question, e.answer, JSON.stringify(e.metadata || {})].join("\n").toLowerCase();
    return hay.includes(text);
  }

  function renderTable() {
    const text = $("filter").value.trim().toLowerCase();
    const want = $("state-filter").value;
    const body = clear($("edit-table").tBodies[0]);
    let shown = 0;
    for (const e of state.edits) {
      if (!matches(e, text, want)) continue;
      shown += 1;
      const tr = el("tr", { cls: "clickable" + (e.id === state.selected ? " selected" : "") });
      tr.dataset.id = String(e.id);
      const img = el("img", { cls: "thumb" });
      img.alt = "";
      if (e.image) fillImage(img, e);
      tr.append(el("td", {}, img), el("td", { text: e.id }), el("td", { cls: "q", text: e.question }),
        el("td", { cls: "a", text: e.answer }), el("td", { text: e.version }), el("td", {}, badges(e)),
        el("td", { text: e.hits === undefined || e.hits === null ? "" : e.hits }));
      tr.addEventListener("click", () => selectEdit(e.id));
      body.append(tr);
    }
    $("count").textContent = `${shown} of ${state.edits.length} edits`;
  }

  function editLink(id) {
    const a = el("a", { cls: "edit-link", text: `edit ${id}` });
    a.addEventListener("click", () => { show("edits"); selectEdit(id); });
    return a;
  }

  function table(cols, rows, rowClass) {
    const t = el("table", { cls: "grid small" });
    const hr = el("tr");
    for (const c of cols) hr.append(el("th", { text: c[0] }));
    t.append(el("thead", {}, hr));
    const tb = el("tbody");
    for (const r of rows) {
      const tr = el("tr", { cls: rowClass ? rowClass(r) : "" });
      for (const c of cols) {
        const v = c[1](r);
        tr.append(v instanceof Node ? el("td", {}, v) : el("td", { text: v }));
      }
      tb.append(tr);
    }
    t.append(tb);
    return t;
  }

  async function selectEdit(id) {
    state.selected = id;
    for (const tr of $("edit-table").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === String(id));
    try {
      const [e, nb] = await Promise.all([api(`/edits/${id}`), api(`/edits/${id}/neighbours?k=5`)]);
      renderDetail(e, nb);
    } catch (err) { failed(err); }
  }

  function renderDetail(e, nb) {
    const d = clear($("detail"));
    d.dataset.id = String(e.id);
    const head = el("div", { cls: "probe-head" });
    if (e.image) { const img = el("img", { cls: "big" }); img.alt = "the edit's image"; fillImage(img, e); head.append(img); }
    const kv = el("dl", { cls: "kv" });
    const add = (k, v) => kv.append(el("dt", { text: k }), v instanceof Node ? el("dd", {}, v) : el("dd", { text: v }));
    add("edit", `${e.id} (version ${e.version})`);
    add("question", e.question);
    add("answer", e.answer);
    add("state", badges(e));
    add("hits", e.hits === undefined || e.hits === null ? "–" : e.hits);
    add("positives", (e.positives || []).map((p) => p.text || "(image)").join(" | ") || "–");
    add("metadata", el("span", { cls: "mono", text: JSON.stringify(e.metadata || {}) }));
    head.append(kv);
    d.append(el("h3", { text: `Edit ${e.id}` }), head);

    const del = el("button", { cls: "danger write", text: "Delete edit", id: "delete-edit" });
    del.type = "button";
    del.addEventListener("click", () => {
      if (del.dataset.armed !== "1") { del.dataset.armed = "1"; del.textContent = "Click again to delete"; return; }
      deleteEdit(e.id);
    });
    d.append(del);

    d.append(el("h3", { text: "Scope: one row per key" }));
    d.append(table([["key", (s) => s.origin], ["threshold", (s) => num(s.threshold)],
      ["hardest negative", (s) => num(s.hardest_negative)], ["from", (s) => s.hardest_negative_source || "–"],
      ["margin", (s) => signed(s.margin)], ["covers", (s) => s.covers], ["reason", (s) => s.reason]],
    e.scope || []));
    if ((e.uncovered || []).length) {
      d.append(el("h3", { text: "Positives left uncovered" }));
      d.append(table([["positive", (u) => u.origin], ["why", (u) => u.reason]], e.uncovered));
    }

    d.append(el("h3", { text: "Nearest edits (this edit's anchor key routed through their scopes)" }));
    d.append(table([["edit", (n) => editLink(n.edit_id)], ["answer", (n) => n.answer], ["key", (n) => n.key],
      ["score", (n) => num(n.score)], ["threshold", (n) => num(n.threshold)], ["margin", (n) => signed(n.margin)],
      ["in scope", (n) => (n.in_scope ? "yes" : "no")]], nb.neighbours || []));
    const rel = el("p", { cls: "small muted" });
    rel.append(`constrained by: ${(nb.constrained_by || []).join(", ") || "none"} · constrains: ` +
      `${(nb.holders || []).join(", ") || "none"}`);
    d.append(rel);

    d.append(el("h3", { text: "History" }));
    const hist = (e.history || []).slice().reverse();
    d.append(table([["v", (h) => h.version], ["question", (h) => h.question], ["answer", (h) => h.answer],
      ["reason", (h) => h.reason], ["when", (h) => (h.created_at ? new Date(h.created_at * 1000).toLocaleString() : "–")],
      ["", (h) => {
        if (h.version === e.version) return el("span", { cls: "muted", text: "current" });
        const b = el("button", { cls: "write rollback", text: `Roll back to v${h.version}` });
        b.type = "button";
        b.dataset.version = String(h.version);
        b.addEventListener("click", () => rollback(e.id, h.version));
        return b;
      }]], hist));
  }

  async function addEdit() {
    try {
      const body = { question: $("add-question").value, answer: $("add-answer").value };
      const image = await readFile($("add-image"));
      if (image) body.image = image;
      const meta = $("add-metadata").value.trim();
      if (meta) {
        try { body.metadata = JSON.parse(meta); } catch (err) { status("metadata must be a JSON object", true); return; }
      }
      if ($("add-tune").value) body.tune = $("add-tune").value;
      const r = await api("/edits", { method: "POST", json: body });
      status(`added edit ${r.id}`);
      $("add-form").reset();
      state.selected = r.id;
      await loadEdits();
    } catch (e) { failed(e); }
  }

  async function deleteEdit(id) {
    try {
      await api(`/edits/${id}`, { method: "DELETE" });
      status(`deleted edit ${id}`);
      await loadEdits();
    } catch (e) { failed(e); }
  }

  async function rollback(id, version) {
    try {
      const r = await api(`/edits/${id}/rollback`, { method: "POST", json: { version } });
      status(`edit ${id} rolled back to v${version} (now v${r.version})`);
      await loadEdits();
    } catch (e) { failed(e); }
  }

  // ------------------------------------------------------------------ probe
  async function runProbe() {
    try {
      const prompt = $("probe-question").value;
      const image = await readFile($("probe-image"));
      const body = { prompt };
      if (image) body.image = image;
      const k = $("probe-k").value;
      status("probing…");
      const [ex, gen, bare] = await Promise.all([
        api(`/route:explain?k=${k}`, { method: "POST", json: body }),
        api("/generate", { method: "POST", json: { ...body, max_new_tokens: 16 } }),
        api("/generate:bare?max_new_tokens=16", { method: "POST", json: body }),
      ]);
      const row = ex.results[0];
      state.probe = { prompt, image, routed: row.edit_id };
      state.probes = [state.probe, ...state.probes.filter((p) => p.prompt !== prompt || p.image !== image)].slice(0, 20);
      renderProbe(row, gen.results[0], bare.results[0], image);
      status("");
    } catch (e) { failed(e); }
  }

  function renderProbe(row, gen, bare, image) {
    $("probe-result").hidden = false;
    const prev = $("probe-preview");
    prev.hidden = !image;
    if (image) prev.src = image;
    const routed = clear($("probe-routed"));
    if (row.edit_id === null || row.edit_id === undefined) routed.textContent = "no edit";
    else routed.append(editLink(row.edit_id), ` v${row.edit_version} → ${row.answer}`);
    $("probe-explanation").textContent = row.explanation || "";
    $("bare-answer").textContent = bare.text;
    $("edited-answer").textContent = gen.text + (gen.edit_id === null || gen.edit_id === undefined ? "" : `  [edit ${gen.edit_id}]`);
    const tb = clear($("candidates").tBodies[0]);
    for (const c of row.candidates || []) {
      const tr = el("tr", { cls: c.edit_id === row.edit_id ? "winner" : "" });
      tr.append(el("td", {}, editLink(c.edit_id)), el("td", { text: c.answer }), el("td", { text: c.key }),
        el("td", { text: num(c.score) }), el("td", { text: num(c.threshold) }), el("td", { text: signed(c.margin) }),
        el("td", { cls: "small", text: c.why }));
      tb.append(tr);
    }
    $("feedback-box").hidden = true;
    clear($("feedback-actions"));
  }

  function refreshFeedbackChoices() {
    const sel = clear($("feedback-expected"));
    const none = el("option", { text: "no edit (it should not fire)" });
    none.value = "";
    sel.append(none);
    for (const e of state.edits) {
      const o = el("option", { text: `edit ${e.id}: ${e.question} → ${e.answer}` });
      o.value = String(e.id);
      sel.append(o);
    }
  }

  function openFeedback() {
    refreshFeedbackChoices();
    $("feedback-box").hidden = false;
  }

  async function sendFeedback() {
    if (!state.probe) return;
    try {
      const v = $("feedback-expected").value;
      const body = { prompt: state.probe.prompt, expected_edit_id: v === "" ? null : Number(v) };
      if (state.probe.image) body.image = state.probe.image;
      const r = await api("/feedback", { method: "POST", json: body });
      const ul = clear($("feedback-actions"));
      for (const a of r.actions) ul.append(el("li", { text: a }));
      status(r.resolved ? "feedback applied: the input now routes as expected" : "feedback applied (not resolved yet)");
      await loadEdits();
    } catch (e) { failed(e); }
  }

  // ------------------------------------------------------------------ scope map
  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  function colour(id) { return `hsl(${(id * 137.508) % 360}, 65%, 45%)`; }

  async function mapData() {
    const withImage = state.probes.filter((p) => p.image);
    const textOnly = state.probes.filter((p) => !p.image);
    const calls = [];
    if (withImage.length) calls.push(api("/scope-map", { method: "POST", json: { prompt: withImage.map((p) => p.prompt), image: withImage.map((p) => p.image) } }));
    if (textOnly.length) calls.push(api("/scope-map", { method: "POST", json: { prompt: textOnly.map((p) => p.prompt) } }));
    if (!calls.length) calls.push(api("/scope-map"));
    const got = await Promise.all(calls);
    return { ...got[0], probes: got.flatMap((g) => g.probes || []) };
  }

  async function drawMap() {
    try {
      const m = await mapData();
      const root = clear($("map"));
      const pts = m.points || [];
      const all = [...pts.map((p) => [p.x - p.radius, p.y - p.radius, p.x + p.radius, p.y + p.radius]),
        ...(m.probes || []).map((p) => [p.x, p.y, p.x, p.y])];
      let [x0, y0, x1, y1] = [-1, -1, 1, 1];
      if (all.length) {
        x0 = Math.min(...all.map((b) => b[0])); y0 = Math.min(...all.map((b) => b[1]));
        x1 = Math.max(...all.map((b) => b[2])); y1 = Math.max(...all.map((b) => b[3]));
      }
      const span = Math.max(x1 - x0, y1 - y0, 1e-6);
      const scale = 600 / span;
      const X = (x) => 20 + (x - x0) * scale;
      const Y = (y) => 620 - (y - y0) * scale;
      for (const p of pts) {
        const g = svg("g", { class: "key", "data-edit": p.edit_id });
        const c = svg("circle", { cx: X(p.x), cy: Y(p.y), r: Math.max(2, p.radius * scale), fill: colour(p.edit_id),
          "fill-opacity": 0.12, stroke: colour(p.edit_id), "stroke-width": 1.5 });
        const t = svg("title");
        t.textContent = `edit ${p.edit_id} (${p.answer}) key ${p.key}: threshold ${num(p.threshold)}`;
        c.append(t);
        g.append(c, svg("circle", { cx: X(p.x), cy: Y(p.y), r: 3, fill: colour(p.edit_id) }));
        const label = svg("text", { x: X(p.x) + 5, y: Y(p.y) - 5, "font-size": 11, fill: colour(p.edit_id) });
        label.textContent = String(p.edit_id);
        g.append(label);
        g.addEventListener("click", () => { show("edits"); selectEdit(p.edit_id); });
        root.append(g);
      }
      for (const p of m.probes || []) {
        const g = svg("g", { class: "probe" });
        const cx = X(p.x), cy = Y(p.y);
        g.append(svg("path", { d: `M${cx - 6},${cy - 6}L${cx + 6},${cy + 6}M${cx - 6},${cy + 6}L${cx + 6},${cy - 6}`,
          stroke: "#111", "stroke-width": 2 }));
        const t = svg("title");
        t.textContent = `probe "${p.prompt}" → ${p.edit_id === null || p.edit_id === undefined ? "no edit" : "edit " + p.edit_id}`;
        g.append(t);
        root.append(g);
      }
      const legend = clear($("map-legend"));
      const seen = new Set();
      for (const p of pts) {
        if (seen.has(p.edit_id)) continue;
        seen.add(p.edit_id);
        const sw = el("span", { cls: "swatch" });
        sw.style.backgroundColor = colour(p.edit_id);
        legend.append(el("li", {}, sw, `edit ${p.edit_id}: ${p.answer}`));
      }
      const ev = m.explained_variance || [0, 0];
      $("map-info").textContent = `${pts.length} keys of ${seen.size} edits, ${(m.probes || []).length} probes; ` +
        `PCA explains ${(100 * ev[0]).toFixed(1)}% + ${(100 * ev[1]).toFixed(1)}% of the key variance`;
    } catch (e) { failed(e); }
  }

  // ------------------------------------------------------------------ audit (an eval run)
  // The run comes from the server (GET /audit, esg-memory ui --eval DIR) or from a results directory
  // opened here (results.json + audit.jsonl + probe_images/, read in the browser; nothing is uploaded).
  // Both give the same reply: the summary per method and protocol, one method and protocol's edits with
  // their probes, and the method's deletion audit.
  const SHARES = ["correct", "under", "over", "fail"];
  const LABELS = [...SHARES, "unreliable"];

  async function loadAudit(method, protocol) {
    try {
      const local = state.audit && state.audit.local;
      let reply;
      if (local) reply = localReply(local, method, protocol);
      else {
        const q = new URLSearchParams();
        if (method) q.set("method", method);
        if (protocol) q.set("protocol", protocol);
        reply = await api("/audit" + (q.toString() ? "?" + q : ""));
      }
      state.audit = { reply, local };
      renderAudit();
    } catch (e) { failed(e); }
  }

  async function auditImage(sha) {
    if (!sha) return null;
    const local = state.audit && state.audit.local;
    const key = (local ? "local:" : "audit:") + sha;
    if (!state.images.has(key)) {
      if (local) {
        const f = local.files.get(sha);
        if (!f) return null;
        state.images.set(key, URL.createObjectURL(f));
      } else {
        state.images.set(key, URL.createObjectURL(await api(`/audit/images/${sha}`)));
      }
    }
    return state.images.get(key);
  }

  function thumb(sha, cls) {
    const img = el("img", { cls: cls || "mini" });
    img.alt = "";
    if (sha) {
      img.dataset.sha = sha;
      auditImage(sha).then((u) => { if (u) img.src = u; }).catch(() => { img.alt = "image unavailable"; });
    }
    return img;
  }

  function options(sel, values, current) {
    clear(sel);
    for (const v of values) {
      const o = el("option", { text: v });
      o.value = v;
      sel.append(o);
    }
    if (current) sel.value = current;
  }

  function renderAudit() {
    const r = state.audit.reply;
    const info = $("audit-run");
    if (!r.run) {
      info.textContent = "This server has no eval run: start it with `esg-memory ui --eval DIR`, or open a " +
        "results directory (esg-memory eval --out DIR) above.";
      for (const id of ["audit-summary", "audit-table", "deletion-table"]) clear($(id).tBodies[0]);
      return;
    }
    const run = r.run;
    info.textContent = `${run.name}: ${run.source || run.kind || "?"} (${run.image_mode || "?"}), model ` +
      `${run.model || "?"}, seed ${run.seed}; ${run.n_adds} edits, ${run.n_revisions} revisions, ` +
      `${run.n_deletions} deletions` + (state.audit.local ? " · opened from this computer" : "");
    options($("audit-method"), run.methods, r.method);
    options($("audit-protocol"), run.protocols, r.protocol);
    const sb = clear($("audit-summary").tBodies[0]);
    for (const s of r.summary) {
      const tr = el("tr", { cls: "clickable" + (s.method === r.method && s.protocol === r.protocol ? " current" : "") });
      tr.dataset.method = s.method;
      tr.dataset.protocol = s.protocol;
      const share = (k) => `${s.counts[k]}` + (s.shares[k] === null || s.shares[k] === undefined ? "" : ` (${num(s.shares[k], 2)})`);
      tr.append(el("td", { text: s.method }), el("td", { text: s.protocol }), el("td", { text: s.n_edits }),
        el("td", { text: s.n_successful === null || s.n_successful === undefined ? "–" : s.n_successful }),
        ...SHARES.map((k) => el("td", { cls: "share-" + k, text: share(k) })),
        el("td", { text: s.counts.unreliable }));
      tr.addEventListener("click", () => loadAudit(s.method, s.protocol));
      sb.append(tr);
    }
    renderAuditRows();
    renderDeletions();
  }

  function labelBadge(label) { return el("span", { cls: "label " + label, text: label }); }
  // yes / no, green when it is the good outcome (``good``: true, false, or null for neither)
  function flag(v, good = true) {
    if (v === null || v === undefined) return "–";
    return el("span", { cls: good === null ? "" : v === good ? "yes" : "no", text: v ? "yes" : "no" });
  }
  function firedText(f) { return f === null || f === undefined ? "none" : `edit ${f}`; }

  function renderAuditRows() {
    const r = state.audit && state.audit.reply;
    const body = clear($("audit-table").tBodies[0]);
    if (!r || !r.run) return;
    const want = $("audit-label").value;
    let shown = 0;
    for (const row of r.rows) {
      if (want && row.label !== want) continue;
      shown += 1;
      const tr = el("tr", { cls: "clickable audit-row" });
      tr.dataset.case = String(row.case);
      tr.dataset.label = row.label;
      const edit = `${row.edit_id === null || row.edit_id === undefined ? "–" : row.edit_id}` + (row.deleted ? " (deleted)" : "");
      const exact = row.probes.filter((p) => p.exact_match).length;
      tr.append(el("td", {}, thumb(row.image, "thumb")), el("td", { text: edit, title: row.uid }),
        el("td", { cls: "q", text: row.question }), el("td", { cls: "a", text: row.answer }),
        el("td", {}, labelBadge(row.label)), el("td", { text: `${exact}/${row.probes.length} answers ok` }));
      const sub = el("tr", { cls: "audit-probes" });
      sub.hidden = true;
      sub.dataset.case = String(row.case);
      const td = el("td");
      td.colSpan = 6;
      sub.append(td);
      tr.addEventListener("click", () => {
        sub.hidden = !sub.hidden;
        if (!sub.hidden && !td.firstChild) td.append(probeTable(row.probes));
      });
      body.append(tr, sub);
    }
    $("audit-count").textContent = `${shown} of ${r.rows.length} edits (${r.method}, ${r.protocol})`;
  }

  function probeTable(probes) {
    return table([["", (p) => thumb(p.image)], ["kind", (p) => p.kind], ["question", (p) => p.question],
      ["target", (p) => p.target], ["generated", (p) => p.generated],
      ["answer ok", (p) => flag(p.exact_match)], ["fired", (p) => firedText(p.fired)],
      ["own edit", (p) => flag(p.owner_fired, null)], ["changed", (p) => flag(p.changed, false)],
      ["score", (p) => num(p.score)], ["threshold", (p) => num(p.threshold)], ["margin", (p) => signed(p.margin)]],
    probes);
  }

  function residueText(p) {
    if (!p) return "–";
    if (!p.residue) return "–";
    const diff = ["text", "tokens", "top10", "bits"].filter((k) => p.residue[k]);
    return el("span", { cls: diff.length ? "no" : "yes", text: diff.length ? diff.join(", ") : "none" });
  }

  function renderDeletions() {
    const r = state.audit.reply;
    const body = clear($("deletion-table").tBodies[0]);
    const d = r.deletion;
    $("deletion-info").textContent = d ? `${d.n_deleted} deleted edits (${r.method}); residue shares right ` +
      `after: text ${num(d.right_after.text, 2)}, bits ${num(d.right_after.bits, 2)}; at end: text ` +
      `${num(d.final.text, 2)}, bits ${num(d.final.bits, 2)}` : "";
    for (const row of r.deletions) {
      const fin = new Map(row.final.map((p) => [p.probe, p]));
      for (const p of row.right_after) {
        const q = fin.get(p.probe);
        const tr = el("tr", { cls: "deletion-row" });
        tr.dataset.case = String(row.case);
        tr.append(el("td", {}, thumb(p.image)), el("td", { text: row.edit_id, title: row.uid }),
          el("td", { text: p.kind }), el("td", { text: p.question }), el("td", { text: p.target }),
          el("td", { text: p.generated }), el("td", {}, residueText(p)), el("td", { text: firedText(p.fired) }),
          el("td", { text: q ? q.generated : "–" }), el("td", {}, residueText(q)),
          el("td", { text: q ? firedText(q.fired) : "–" }));
        body.append(tr);
      }
    }
  }

  // a results directory opened in the browser: the same reply as GET /audit, computed here
  async function openLocalRun() {
    try {
      const files = [...$("audit-dir").files];
      const depth = (f) => (f.webkitRelativePath || f.name).split("/").length;
      const pick = (name) => files.filter((f) => f.name === name).sort((a, b) => depth(a) - depth(b))[0];
      const res = pick("results.json"), aud = pick("audit.jsonl");
      if (!res || !aud) { status("that directory holds no results.json and audit.jsonl (esg-memory eval --out DIR)", true); return; }
      const results = JSON.parse(await res.text());
      const lines = (await aud.text()).split("\n").filter((t) => t.trim()).map((t) => JSON.parse(t));
      const header = lines.find((x) => x.type === "header");
      if (!header || header.format !== "esg-memory-eval-audit") { status("audit.jsonl is not an esg-memory audit file", true); return; }
      const imgs = new Map();
      for (const f of files) {
        const m = /^([0-9a-f]{64})\.png$/.exec(f.name);
        if (m && (f.webkitRelativePath || "").includes("probe_images/")) imgs.set(m[1], f);
      }
      const base = (res.webkitRelativePath || "").split("/");
      const name = base.length > 1 ? base[base.length - 2] : "results";
      state.audit = { reply: null, local: { results, lines, header, files: imgs, name } };
      status("");
      await loadAudit();
    } catch (e) { failed(e); }
  }

  function localReply(local, method, protocol) {
    const { results, lines, header } = local;
    const methods = header.methods, protocols = header.protocols;
    method = method && methods.includes(method) ? method : (methods.includes("ours") ? "ours" : methods[0]);
    protocol = protocol && protocols.includes(protocol) ? protocol : (protocols.includes("retention") ? "retention" : protocols[0]);
    const cases = new Map(), probes = new Map();
    for (const x of lines) {
      if (x.type !== "case") continue;
      cases.set(x.case, x);
      for (const p of x.probes) probes.set(p.probe, p);
    }
    const full = (p) => { const s = probes.get(p.probe) || {}; return { kind: s.kind, question: s.question, image: s.image, ...p }; };
    const caseOf = (c) => { const k = cases.get(c) || {}; return { case: c, uid: k.uid, edit_id: k.edit_id, question: k.question, answer: k.answer, image: k.image, deleted: !!k.deleted }; };
    const edits = lines.filter((x) => x.type === "edit");
    const summary = [];
    for (const m of methods) {
      for (const p of protocols) {
        const agg = ((results.methods || {})[m] || {})[p];
        const rows = edits.filter((x) => x.method === m && x.protocol === p);
        if (!agg && !rows.length) continue;
        const a = (agg || {}).audit || {};
        const counts = Object.fromEntries(LABELS.map((k) => [k, rows.filter((x) => x.label === k).length]));
        summary.push({ method: m, protocol: p, n_edits: rows.length, n_successful: a.n_successful,
          shares: Object.fromEntries(SHARES.map((k) => [k, a[k] === undefined ? null : a[k]])), counts });
      }
    }
    const rows = edits.filter((x) => x.method === method && x.protocol === protocol).map((x) => {
      const ps = x.probes.map(full);
      const rel = ps.find((p) => p.kind === "reliability");
      const row = caseOf(x.case);
      if (rel && rel.target !== null && rel.target !== undefined) row.answer = rel.target;
      return { ...row, label: x.label, reliable: x.reliable, generalizes: x.generalizes, leaks: x.leaks, probes: ps };
    });
    const stages = new Map();
    for (const x of lines) {
      if (x.type !== "deletion" || x.method !== method) continue;
      if (!stages.has(x.case)) stages.set(x.case, {});
      stages.get(x.case)[x.stage] = x.probes.map(full);
    }
    const deletions = [...stages.keys()].sort((a, b) => a - b).map((c) => ({ ...caseOf(c),
      right_after: stages.get(c).right_after || [], final: stages.get(c).final || [] }));
    const d = results.data || {}, s = results.stream || {}, mo = results.model || {};
    const run = { name: local.name, source: d.source, kind: d.kind, image_mode: d.image_mode, model: mo.spec,
      encoder: mo.encoder, seed: results.seed, n_adds: s.n_adds, n_revisions: s.n_revisions,
      n_deletions: s.n_deletions, methods, protocols };
    return { run, method, protocol, labels: LABELS, summary, rows,
      deletion: ((results.methods || {})[method] || {}).deletion || null, deletions };
  }

  document.addEventListener("DOMContentLoaded", start);
})();
