// The local inspector page: polls the host's JSON API once a second and renders it.
// Plain JavaScript, no framework, nothing fetched from elsewhere. Every value from a
// delivery is a stranger's text: it only ever goes into the page as textContent.
"use strict";

const POLL_MS = 1000;
const OK = new Set(["accepted", "verify_answered", "handled"]);
const WARN = new Set(["duplicate", "unhandled", "retried", "interrupted"]);
const BAD = new Set(["signature_rejected", "unsigned_rejected", "oversize", "verify_refused",
  "unavailable", "dead_lettered", "stale"]);

const state = {
  version: 0,
  deliveries: new Map(),   // id -> summary
  order: [],               // ids, newest first
  selected: null,          // delivery id shown in the detail
  deadLetters: [],
  lettersSeen: "",
  selectedLetter: null,    // sequence number shown in the detail
  lettersMore: false,      // the server's list stops at its limit
  vehicles: [],
  vehiclesSeen: "",
  vehiclesMore: false,     // the server's list stops at its limit
  vehiclesUnavailable: null,  // why the store cannot be read (turned off, failing), or null
  selectedVehicle: null,   // vehicleId shown in the detail
  vehicleSeen: "",         // its JSON as last drawn
  tab: "deliveries",
  curl: null,              // {id, command}: the last "Copy as curl" of the shown delivery
  detailDirty: false,      // the shown delivery changed and is not drawn again yet
  statusKind: null,        // "poll": the last poll's problem (cleared by a good poll); "action"
  filter: { outcome: "", eventType: "", vehicleId: "", text: "" },
};
const TABS = ["deliveries", "dlq", "vehicles"];

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(word) {
  if (!word) return el("span", { class: "muted", text: "—" });
  const kind = OK.has(word) ? "ok" : WARN.has(word) ? "warn" : BAD.has(word) ? "bad" : "";
  return el("span", { class: `badge ${kind}`, "data-value": word, text: word });
}

// Prose (a reason, an error message) wraps only between words: each word is kept whole.
function prose(text) {
  return el("span", { class: "prose" }, String(text).split(/(\s+)/).map((part) =>
    part === "" ? null : /^\s+$/.test(part) ? part : el("span", { class: "w", text: part })));
}

function ms(value) {
  return value === null || value === undefined ? "—" : `${value} ms`;
}

function time(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.` +
    pad(d.getMilliseconds(), 3);
}

function show(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

// `kind` "poll": a problem of the polling (the host, the queue's counts, a tab's list), which
// the next good poll clears; "action": what a button did (replay, purge, resend, copy), which
// stays until something else is said.
function setStatus(text, isError, kind = "action") {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
  state.statusKind = text ? kind : null;
}

function clearPollStatus() {
  if (state.statusKind === "poll") setStatus("", false, null);
}

class ApiError extends Error {
  constructor(status, text) {
    super(`${status}: ${text}`);
    this.status = status;
    this.text = text;
  }
}

async function api(path, options) {
  const response = await fetch(`api/${path}`, options);
  const body = await response.text();
  if (!response.ok) throw new ApiError(response.status, body.trim());
  return JSON.parse(body);
}

// -- deliveries ------------------------------------------------------------------------------

function processingCell(summary) {
  const p = summary.processing;
  if (!p) {
    const queued = summary.outcome === "accepted";
    return el("span", { class: "muted", text: queued ? "queued" : "—" });
  }
  const detail = p.deadLetterReason || p.errorType;
  return el("span", {}, badge(p.outcome), detail ? " " : "",
    detail ? el("span", { class: "token", text: detail }) : null,
    summary.attempts > 1 ? el("span", { class: "muted", text: ` ×${summary.attempts}` }) : "");
}

function outcomeCell(summary) {
  if (!summary.outcome && summary.status === null) return badge(null);
  return el("span", {}, badge(summary.outcome || `HTTP ${summary.status}`),
    summary.why ? el("span", { class: "why" }, prose(summary.why)) : null,
    shapeMark(summary.shape));
}

// A delivery whose payload shape the project does not read (shared/shapes.py).
function shapeMark(shape) {
  if (!shape || shape.known) return null;
  return el("span", { class: "badge warn new-shape", "data-shape": shape.id,
    title: `Payload shape ${shape.id} is new to this project`, text: "new shape" });
}

function deliveryRow(summary) {
  const row = el("tr", {
    tabindex: 0, "data-id": summary.id, "data-event-id": summary.eventId || "",
    "data-outcome": summary.outcome || "",
    "data-processing": summary.processing ? summary.processing.outcome : "",
    "aria-current": state.selected === summary.id ? "true" : null,
    onclick: () => openDelivery(summary.id),
    onkeydown: (event) => activate(event, () => openDelivery(summary.id)),
  },
  el("td", { class: "mono", text: time(summary.receivedAt) }),
  el("td", { class: "mono wide-only",
    text: summary.route ? `/api/${summary.route}` : "(earlier run)" }),
  el("td", {}, outcomeCell(summary)),
  el("td", { text: show(summary.eventType) }),
  el("td", { class: "id mono wide-only", title: summary.vehicleId || null,
    text: show(summary.vehicleId) }),
  el("td", {}, processingCell(summary)),
  el("td", { class: "num handler-ms", text: ms(summary.processing && summary.processing.handlerMs) }),
  el("td", { class: "num", text: ms(summary.latencyMs) }));
  return row;
}

// -- filter ------------------------------------------------------------------------------------

function outcomesOf(summary) {
  return [summary.outcome, summary.processing && summary.processing.outcome].filter(Boolean);
}

function searchable(summary) {
  const p = summary.processing || {};
  return [summary.eventId, summary.eventType, summary.vehicleId, summary.route, summary.why,
    summary.status, summary.outcome, p.outcome, p.deadLetterReason, p.errorType, p.errorMessage]
    .filter((v) => v !== null && v !== undefined).join(" ").toLowerCase();
}

function matchesFilter(summary) {
  const f = state.filter;
  if (f.outcome && !outcomesOf(summary).includes(f.outcome)) return false;
  if (f.eventType && summary.eventType !== f.eventType) return false;
  if (f.vehicleId && !(summary.vehicleId || "").toLowerCase().includes(f.vehicleId.toLowerCase())) {
    return false;
  }
  return !f.text || searchable(summary).includes(f.text.toLowerCase());
}

function fillOptions(select, values) {
  const chosen = select.value;
  const wanted = ["", ...[...new Set(values)].sort()];
  if (chosen && !wanted.includes(chosen)) wanted.push(chosen);
  const have = [...select.options].map((o) => o.value);
  if (have.join("\n") === wanted.join("\n")) return;
  select.replaceChildren(...wanted.map((v) => el("option", { value: v, text: v || "any" })));
  select.value = chosen;
}

function readFilter() {
  state.filter = {
    outcome: $("filter-outcome").value, eventType: $("filter-eventType").value,
    vehicleId: $("filter-vehicleId").value.trim(), text: $("filter-text").value.trim(),
  };
  renderDeliveries();
}

function activate(event, action) {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    action();
  }
}

function renderDeliveries() {
  const body = $("deliveries").tBodies[0];
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.id : undefined;
  const all = state.order.map((id) => state.deliveries.get(id));
  fillOptions($("filter-outcome"), all.flatMap(outcomesOf));
  fillOptions($("filter-eventType"), all.map((s) => s.eventType).filter(Boolean));
  const shown = all.filter(matchesFilter);
  body.replaceChildren(...shown.map(deliveryRow));
  $("deliveries-empty").hidden = all.length > 0;
  $("deliveries-filtered").hidden = !all.length || shown.length > 0;
  $("count-deliveries").textContent = !all.length ? ""
    : shown.length === all.length ? `(${all.length})` : `(${shown.length} of ${all.length})`;
  if (focused !== undefined) {
    const again = body.querySelector(`tr[data-id="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

// `proseColumns`: indexes of the columns that hold prose (wrapped between words).
function table(caption, headers, rows, proseColumns = []) {
  return el("div", { class: "scroll" }, el("table", {},
    el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c, i) =>
      c instanceof Node ? el("td", {}, c)
        : proseColumns.includes(i) && c ? el("td", {}, prose(show(c)))
          : el("td", { text: show(c) })))))));
}

function facts(pairs) {
  return el("dl", { class: "facts" },
    pairs.map(([k, v]) => [el("dt", { text: k }), el("dd", {}, v instanceof Node ? v : show(v))]));
}

// `pane`: the detail section's id; its heading's id is unique to it (three panes may be open).
function detailHead(pane, title, close) {
  return el("div", { class: "detail-head" },
    el("h2", { id: `${pane}-title`, text: title }),
    el("button", { type: "button", class: "close", onclick: close,
      "aria-label": "Close the detail", text: "Close" }));
}

// `prefix`: for the ids of its signals table and body ("" in the delivery's detail, "dlq-" in
// the dead letter's), unique while both are open.
function bodySections(doc, prefix = "") {
  const parts = [];
  if (doc.parseError) {
    parts.push(el("h3", { text: "Processor" }),
      el("p", { class: "problem", text: `The processor cannot read this body: ${doc.parseError}` }));
  }
  if (doc.signals.length) {
    parts.push(el("h3", { text: `Signals (${doc.signals.length})` }),
      table("Signals, as the processor parses them", ["code", "value", "unit", "oemUpdatedAt",
        "status"], doc.signals.map((s) => [s.code || s.path,
        s.value === null || typeof s.value !== "object" ? s.value : JSON.stringify(s.value),
        s.unit, s.oemUpdatedAt, s.status])));
    parts[parts.length - 1].querySelector("table").id = `${prefix}signals`;
  }
  if (doc.triggers.length) {
    parts.push(el("h3", { text: "Triggers" }),
      table("What triggered the delivery", ["type", "code", "signal"],
        doc.triggers.map((t) => [t.type, t.code, t.path])));
  }
  if (doc.errors.length) {
    parts.push(el("h3", { text: "Vehicle errors" }),
      table("data.errors", ["type", "code", "state", "description"],
        doc.errors.map((e) => [e.type, e.code, e.state, e.description]), [3]));
  }
  parts.push(el("h3", { text: "Body" }),
    el("pre", { id: `${prefix}body`, tabindex: 0, text: doc.body === null ? "(not kept: received before this run)" : doc.body }));
  return parts;
}

function withId(wrapper, id) {
  wrapper.querySelector("table").id = id;
  return wrapper;
}

function attemptError(a) {
  if (a.errorType) return a.errorMessage ? `${a.errorType}: ${a.errorMessage}` : a.errorType;
  return a.deadLetterReason;
}

function replayActions(doc) {
  if (!doc.replayable) return [];
  const shown = state.curl && state.curl.id === doc.id ? state.curl.command : null;
  return [
    el("div", { class: "actions" },
      el("button", { type: "button", id: "copy-curl", onclick: () => copyCurl(doc.id),
        text: "Copy as curl" }),
      el("button", { type: "button", id: "resend", onclick: () => resend(doc.id),
        text: "Resend" })),
    ...(shown ? [el("pre", { class: "command", id: "curl-command", tabindex: 0, text: shown })] : []),
  ];
}

async function copyCurl(id) {
  let doc;
  try {
    doc = await api(`deliveries/${id}/curl`);
  } catch (err) {
    setStatus(`Cannot build a curl command for #${id}: ${err.message}`, true);
    return;
  }
  state.curl = { id, command: doc.command };
  let copied = false;
  try {
    await navigator.clipboard.writeText(doc.command);
    copied = true;
  } catch (err) {
    copied = false;  // no clipboard access (a headless or locked-down browser): shown below
  }
  setStatus(copied ? `Copied a curl command for #${id}: the original bytes and signature.`
    : `The curl command for #${id} is below (the clipboard was not available).`);
  if (state.selected !== id) return;
  const detail = await api(`deliveries/${id}`);
  if (state.selected === id) renderDeliveryDetail(detail);
}

async function resend(id) {
  try {
    const result = await api(`deliveries/${id}/resend`, { method: "POST" });
    setStatus(`Resent #${id} with its original bytes and signature: HTTP ${result.status} ` +
      `${result.body}`, result.status >= 300);
  } catch (err) {
    setStatus(`Resend of #${id} failed: ${err.message}`, true);
  }
}

function renderDeliveryDetail(doc) {
  const pane = $("delivery-detail");
  const attempts = doc.processingAttempts.map((a) => [time(a.at), a.deliveryCount,
    badge(a.outcome), attemptError(a), ms(a.handlerMs), ms(a.durationMs)]);
  pane.replaceChildren(
    detailHead("delivery-detail", `Delivery #${doc.id}${doc.eventType ? ` · ${doc.eventType}` : ""}`, closeDelivery),
    facts([
      ["Received", new Date(doc.receivedAt).toLocaleString()],
      ["Route", doc.route ? `POST /api/${doc.route}` : "(received before this run)"],
      ["Answer", doc.status === null ? "—" : `HTTP ${doc.status}`],
      ["Outcome", outcomeCell(doc)],
      ["eventId", doc.eventId], ["vehicleId", doc.vehicleId],
      ["Latency", doc.latencyMs === null ? null : `${doc.latencyMs} ms`],
      ["Payload shape", doc.shape ? el("span", { id: "shape" }, el("span", { class: "mono",
        text: doc.shape.id }), doc.shape.known ? " (known)"
        : ` (new to the project: ${doc.shape.newParts.join("; ")})`) : null],
      ["Trace id", el("span", { class: "mono", id: "trace-id", text: show(doc.traceId) })],
    ]),
    ...replayActions(doc),
    el("h3", { text: "Processing" }),
    attempts.length
      ? withId(table("Each delivery from the queue: the handlers' own run time, and the whole "
        + "function's", ["at", "delivery", "outcome", "reason / error", "handlers", "function"],
        attempts, [3]), "attempts")
      : el("p", { class: "muted", text: doc.outcome === "accepted" ? "Queued, not processed yet."
        : "Not queued." }),
    ...stateSection(doc),
    ...bodySections(doc),
    el("h3", { text: "Request headers" }),
    table("SC-Signature shows its first 8 hex digits only", ["name", "value"], doc.headers),
    el("h3", { text: "Response" }),
    el("pre", { tabindex: 0, text: show(doc.response) }));
  pane.hidden = false;
  pane.parentElement.classList.add("with-detail");
}

// What processing this delivery did to the vehicle state store (ApplyResult.to_json()).
function stateSection(doc) {
  const result = doc.vehicleState;
  if (!result) {
    if (!doc.processingAttempts.length ||
        !["VEHICLE_STATE", "VEHICLE_ERROR"].includes(doc.eventType)) return [];
    return [el("h3", { text: "Vehicle state" }), el("p", { class: "muted", id: "delivery-state",
      text: "Not applied to the vehicle state store (it is off, or the event was not processed)." })];
  }
  const codes = (list) => (list.length ? list.join(", ") : "none");
  const errors = (list) => (list.length ? list.map((e) => `${e.type} ${e.code || ""}`.trim())
    .join(", ") : "none");
  const again = doc.vehicleStateReappliedBy || [];
  const rows = [
    ["changed", codes(result.changed)],
    ["left alone as stale", codes(result.stale)],
    ["fetched again, unchanged", codes(result.refreshed || [])],
    ["skipped", result.skipped.length ? result.skipped.map((k) => `${k.code || "(no code)"} ` +
      `(${k.reason})`).join(", ") : "none"],
    ["errors opened", errors(result.errorsOpened)],
    ["errors resolved", errors(result.errorsResolved)],
  ];
  // A retry applies the event again and finds what the first application stored: its readings
  // are not news there, so they are not shown as what the event did.
  if (again.length) {
    rows.push(["applied again", `by attempt ${again.join(", ")}: already applied by an ` +
      "earlier attempt, nothing new to store"]);
  }
  const by = doc.vehicleStateAppliedBy;
  return [el("h3", { text: "Vehicle state" }), withId(table(
    `What the first processing that applied it${by ? ` (attempt ${by})` : ""} did to the ` +
    "stored state", ["signals", "codes"], rows), "delivery-state")];
}

async function openDelivery(id) {
  if (state.selected !== id) state.curl = null;
  state.selected = id;
  renderDeliveries();
  let doc;
  try {
    doc = await api(`deliveries/${id}`);
  } catch (err) {
    if (state.selected !== id) return;  // another one was opened meanwhile
    closeDelivery();  // not another delivery's detail under this one's row
    setStatus(`Cannot show delivery #${id}: ${err.message}`, true);
    return;
  }
  if (state.selected !== id) return;  // a slow answer: another one was opened meanwhile
  state.detailDirty = false;
  renderDeliveryDetail(doc);
  $("delivery-detail").focus();
}

// The shown delivery drawn again (it changed); a failure leaves it to the next poll.
async function refreshDeliveryDetail() {
  const id = state.selected;
  let doc;
  try {
    doc = await api(`deliveries/${id}`);
  } catch (err) {
    if (err.status === 404) state.detailDirty = false;  // left the ring: keep what is shown
    throw err;
  }
  if (state.selected !== id) return;
  state.detailDirty = false;
  renderDeliveryDetail(doc);
}

function closeDelivery() {
  const id = state.selected;
  state.selected = null;
  $("delivery-detail").hidden = true;
  $("delivery-detail").replaceChildren();
  $("view-deliveries").classList.remove("with-detail");
  renderDeliveries();
  const row = $("deliveries").querySelector(`tr[data-id="${id}"]`);
  if (row) row.focus();
}

// -- dead letters ----------------------------------------------------------------------------

function letterRow(letter) {
  const seq = letter.sequenceNumber;
  return el("tr", {
    tabindex: 0, "data-seq": seq, "data-event-id": letter.eventId || "",
    "aria-current": state.selectedLetter === seq ? "true" : null,
    onclick: () => openLetter(seq),
    onkeydown: (event) => activate(event, () => openLetter(seq)),
  },
  el("td", { class: "num", text: seq }),
  el("td", { class: "id mono", title: letter.eventId || null, text: show(letter.eventId) }),
  el("td", { text: show(letter.eventType) }),
  el("td", {}, badge(letter.reason)),
  el("td", { class: "wide-only", text: show(letter.description) }),
  el("td", { class: "num", text: letter.deliveryCount }),
  el("td", { class: "mono wide-only", text: time(letter.enqueuedTime) }));
}

function renderLetters() {
  const body = $("dead-letters").tBodies[0];
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.seq : undefined;
  body.replaceChildren(...state.deadLetters.map(letterRow));
  $("dlq-empty").hidden = state.deadLetters.length > 0;
  $("dlq-more").hidden = !state.lettersMore;
  $("dlq-more").textContent = `Only the first ${state.deadLetters.length} dead letters are ` +
    "listed (python -m shared.cli dlq list --limit N lists more).";
  if (focused !== undefined) {
    const again = body.querySelector(`tr[data-seq="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

async function refreshLetters() {
  const doc = await api("dlq");
  const seen = JSON.stringify([doc.deadLetters, Boolean(doc.more)]);
  if (seen === state.lettersSeen) return;  // unchanged: keep the rows (and the focus)
  state.lettersSeen = seen;
  state.deadLetters = doc.deadLetters;
  state.lettersMore = Boolean(doc.more);
  renderLetters();
}

async function openLetter(seq) {
  state.selectedLetter = seq;
  renderLetters();
  let doc;
  try {
    doc = await api(`dlq/${seq}`);
  } catch (err) {
    if (state.selectedLetter !== seq) return;  // another one was opened meanwhile
    closeLetter();  // not another letter's detail under this one's row
    setStatus(`Cannot show dead letter #${seq}: ${err.message}`, true);
    return;
  }
  if (state.selectedLetter !== seq) return;  // a slow answer: another one was opened meanwhile
  const pane = $("dlq-detail");
  const props = Object.entries(doc.applicationProperties);
  pane.replaceChildren(
    detailHead("dlq-detail", `Dead letter #${doc.sequenceNumber}${doc.eventType ? ` · ${doc.eventType}` : ""}`,
      closeLetter),
    facts([["Reason", badge(doc.reason)], ["Description", doc.description],
      ["Delivery count", doc.deliveryCount], ["messageId", doc.messageId],
      ["eventId", doc.eventId], ["Enqueued", doc.enqueuedTime]]),
    el("div", { class: "actions" },
      el("button", { type: "button", class: "primary", id: "replay",
        onclick: () => replay(seq), text: "Replay" }),
      el("button", { type: "button", class: "danger", id: "purge",
        onclick: () => confirmPurge(seq), text: "Purge…" })),
    ...bodySections(doc, "dlq-"),
    el("h3", { text: "Application properties" }),
    table("As stored with the message", ["name", "value"], props));
  pane.hidden = false;
  pane.parentElement.classList.add("with-detail");
  pane.focus();
}

function closeLetter() {
  const seq = state.selectedLetter;
  state.selectedLetter = null;
  $("dlq-detail").hidden = true;
  $("dlq-detail").replaceChildren();
  $("view-dlq").classList.remove("with-detail");
  renderLetters();
  const row = $("dead-letters").querySelector(`tr[data-seq="${seq}"]`);
  if (row) row.focus();
  else $("tab-dlq").focus();
}

async function replay(seq) {
  try {
    const result = await api(`dlq/${seq}/replay`, { method: "POST" });
    if (result.replayed.length) {
      setStatus(`Replayed dead letter #${seq} as message ${result.replayed[0].messageId}.`);
    } else if (result.failed.length) {
      setStatus(`Replay of #${seq} failed: ${result.failed[0].error}`, true);
    } else {
      setStatus(`Dead letter #${seq} is no longer there (replayed or purged elsewhere).`, true);
    }
  } catch (err) {
    setStatus(`Replay of #${seq} failed: ${err.message}`, true);
  }
  closeLetter();
  await refreshLetters();
}

function confirmPurge(seq) {
  const dialog = $("confirm-purge");
  $("confirm-text").textContent =
    `Dead letter #${seq} will be deleted from the queue for good. It cannot be replayed afterwards.`;
  dialog.dataset.seq = String(seq);
  dialog.showModal();
  $("confirm-cancel").focus();
}

async function purgeConfirmed() {
  const dialog = $("confirm-purge");
  const seq = Number(dialog.dataset.seq);
  dialog.close();
  try {
    const result = await api(`dlq/${seq}/purge`, { method: "POST" });
    setStatus(result.purged ? `Purged dead letter #${seq}.`
      : `Dead letter #${seq} was already gone.`, !result.purged);
  } catch (err) {
    setStatus(`Purge of #${seq} failed: ${err.message}`, true);
  }
  closeLetter();
  await refreshLetters();
}

// -- vehicles (the vehicle state store) -------------------------------------------------------

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : null;
}

function vehicleRow(summary) {
  const id = summary.vehicleId;
  return el("tr", {
    tabindex: 0, "data-vehicle-id": id, "data-open-errors": summary.openErrors,
    "aria-current": state.selectedVehicle === id ? "true" : null,
    onclick: () => openVehicle(id),
    onkeydown: (event) => activate(event, () => openVehicle(id)),
  },
  el("td", { class: "id mono", title: id, text: id }),
  el("td", { class: "mono", text: show(localTime(summary.updatedAt)) }),
  el("td", { class: "num", text: summary.signals }),
  el("td", { class: "num" }, summary.openErrors
    ? el("span", { class: "badge bad", text: summary.openErrors }) : "0"));
}

function renderVehicles() {
  const body = $("vehicles").tBodies[0];
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.vehicleId : undefined;
  const unavailable = state.vehiclesUnavailable;
  body.replaceChildren(...state.vehicles.map(vehicleRow));
  $("vehicles-unavailable").hidden = unavailable === null;
  $("vehicles-unavailable").textContent = unavailable === null ? ""
    : `No vehicle state to show: ${unavailable}`;
  $("vehicles-empty").hidden = state.vehicles.length > 0 || unavailable !== null;
  $("vehicles-more").hidden = !state.vehiclesMore;
  $("vehicles-more").textContent = `Only the first ${state.vehicles.length} vehicles are ` +
    "listed, the most recently updated (python -m shared.cli vehicles list --limit N lists " +
    "more).";
  $("count-vehicles").textContent = !state.vehicles.length ? ""
    : state.vehiclesMore ? `(first ${state.vehicles.length})` : `(${state.vehicles.length})`;
  if (focused !== undefined) {
    const again = body.querySelector(`tr[data-vehicle-id="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

async function refreshVehicles() {
  let doc;
  try {
    doc = await api("vehicles");
  } catch (err) {
    // 503: the store is turned off (VEHICLE_STATE_STORE=off) or failing. The host answered:
    // that is this tab's state, said in the tab, not a host that is down.
    if (err.status !== 503) throw err;
    doc = { vehicles: [], more: false, unavailable: err.text };
  }
  const unavailable = doc.unavailable === undefined ? null : doc.unavailable;
  const seen = JSON.stringify([doc.vehicles, Boolean(doc.more), unavailable]);
  if (seen === state.vehiclesSeen) return false;  // unchanged: keep the rows (and the focus)
  state.vehiclesSeen = seen;
  state.vehicles = doc.vehicles;
  state.vehiclesMore = Boolean(doc.more);
  state.vehiclesUnavailable = unavailable;
  renderVehicles();
  return true;
}

// The id in the query string: in a path, `.` and `..` (even as %2E) are resolved away.
function vehiclePath(id) {
  return `vehicle?id=${encodeURIComponent(id)}`;
}

function renderVehicleDetail(doc) {
  const pane = $("vehicle-detail");
  const signals = Object.entries(doc.signals).map(([code, s]) => [code,
    s.value === null || typeof s.value !== "object" ? s.value : JSON.stringify(s.value),
    s.unit, s.oemUpdatedAt, s.error ? `${s.status} ${s.error.type || ""} ${s.error.code || ""}`
      : s.status, s.eventId]);
  const signalTable = withId(table("The latest value of each signal (newest oemUpdatedAt wins)",
    ["signal", "value", "unit", "oemUpdatedAt", "status", "eventId"], signals), "vehicle-signals");
  const errorTable = withId(table("Open errors", ["type", "code", "count", "first seen",
    "last seen", "description"], doc.errors.map((e) => [e.type, e.code, e.count,
    localTime(e.firstSeen), localTime(e.lastSeen), e.description]), [5]), "vehicle-errors");
  pane.replaceChildren(
    detailHead("vehicle-detail", `Vehicle ${doc.vehicleId}`, closeVehicle),
    facts([["vehicleId", el("span", { class: "mono", text: doc.vehicleId })],
      ["Updated", localTime(doc.updatedAt)],
      ["Signals", signals.length], ["Open errors", doc.errors.length]]),
    el("h3", { text: `Signals (${signals.length})` }),
    signals.length ? signalTable : el("p", { class: "muted", text: "No signal stored." }),
    el("h3", { text: `Open errors (${doc.errors.length})` }),
    doc.errors.length ? errorTable : el("p", { class: "muted", text: "No open error." }));
  pane.hidden = false;
  pane.parentElement.classList.add("with-detail");
}

async function openVehicle(id) {
  state.selectedVehicle = id;
  renderVehicles();
  let doc;
  try {
    doc = await api(vehiclePath(id));
  } catch (err) {
    if (state.selectedVehicle !== id) return;  // another one was opened meanwhile
    closeVehicle();  // not another vehicle's detail under this one's row
    setStatus(`Cannot show vehicle ${id}: ${err.message}`, true);
    return;
  }
  if (state.selectedVehicle !== id) return;  // a slow answer: another one was opened meanwhile
  state.vehicleSeen = JSON.stringify(doc);
  renderVehicleDetail(doc);
  $("vehicle-detail").focus();
}

function closeVehicle() {
  const id = state.selectedVehicle;
  state.selectedVehicle = null;
  $("vehicle-detail").hidden = true;
  $("vehicle-detail").replaceChildren();
  $("view-vehicles").classList.remove("with-detail");
  renderVehicles();
  const row = $("vehicles").querySelector(`tr[data-vehicle-id="${CSS.escape(id)}"]`);
  if (row) row.focus();
  else $("tab-vehicles").focus();
}

async function pollVehicles() {
  await refreshVehicles();
  // The open vehicle is read on every poll: a change to a signal older than its newest (or
  // undated) leaves the list as it was. Drawn again only when it changed (keeps the focus).
  const id = state.selectedVehicle;
  if (id === null || state.vehiclesUnavailable !== null) return;
  const doc = await api(vehiclePath(id));
  const seen = JSON.stringify(doc);
  if (id !== state.selectedVehicle || seen === state.vehicleSeen) return;
  state.vehicleSeen = seen;
  renderVehicleDetail(doc);
}

// -- tabs, polling ----------------------------------------------------------------------------

function selectTab(name) {
  state.tab = name;
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    const active = tab === name;
    button.setAttribute("aria-selected", String(active));
    button.tabIndex = active ? 0 : -1;
    $(`view-${tab}`).hidden = !active;
  }
  if (name === "dlq") {
    refreshLetters().catch((err) => setStatus(`Dead letters: ${err.message}`, true, "poll"));
  }
  if (name === "vehicles") {
    pollVehicles().catch((err) => setStatus(`Vehicles: ${err.message}`, true, "poll"));
  }
}

function tabKeys(event) {
  if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
  const step = event.key === "ArrowRight" ? 1 : TABS.length - 1;
  const next = TABS[(TABS.indexOf(state.tab) + step) % TABS.length];
  selectTab(next);
  $(`tab-${next}`).focus();
}

async function poll() {
  try {
    const doc = await api(`deliveries?since=${state.version}`);
    const problems = doc.statsError ? [doc.statsError] : [];
    const kept = new Set(doc.ids);
    for (const summary of doc.deliveries) state.deliveries.set(summary.id, summary);
    for (const id of state.deliveries.keys()) if (!kept.has(id)) state.deliveries.delete(id);
    const changed = doc.version !== state.version || state.order.length !== kept.size;
    state.version = doc.version;
    // Only ids whose summary the page holds (an answer lists each id with its summary).
    state.order = [...kept].filter((id) => state.deliveries.has(id)).sort((a, b) => b - a);
    if (changed) renderDeliveries();
    for (const key of ["active", "deadLettered", "scheduled"]) {
      $(`stat-${key}`).textContent = doc.stats ? String(doc.stats[key]) : "?";
    }
    $("count-dlq").textContent = doc.stats ? `(${doc.stats.deadLettered})` : "";
    // Each refresh on its own: one that fails (a tab's list) stops none of the others, and
    // the shown delivery, once changed, is drawn again until a poll manages to.
    if (state.selected !== null && doc.deliveries.some((d) => d.id === state.selected)) {
      state.detailDirty = true;
    }
    const refreshes = [];
    if (state.selected !== null && state.detailDirty) {
      refreshes.push(["Delivery detail", refreshDeliveryDetail]);
    }
    if (state.tab === "dlq") refreshes.push(["Dead letters", refreshLetters]);
    if (state.tab === "vehicles") refreshes.push(["Vehicles", pollVehicles]);
    for (const [what, refresh] of refreshes) {
      try {
        await refresh();
      } catch (err) {
        problems.push(`${what}: ${err.message}`);
      }
    }
    if (problems.length) setStatus(problems.join(" · "), true, "poll");
    else clearPollStatus();  // the host answers again: its last problem is gone
    document.body.dataset.version = String(state.version);
  } catch (err) {
    setStatus(`The local host does not answer (${err.message}); retrying.`, true, "poll");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of TABS) {
    $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
    $(`tab-${tab}`).addEventListener("keydown", tabKeys);
  }
  $("confirm-cancel").addEventListener("click", () => $("confirm-purge").close());
  $("confirm-ok").addEventListener("click", purgeConfirmed);
  for (const id of ["filter-outcome", "filter-eventType", "filter-vehicleId", "filter-text"]) {
    $(id).addEventListener("input", readFilter);
    $(id).addEventListener("change", readFilter);
  }
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || $("confirm-purge").open) return;
    if (state.tab === "deliveries" && state.selected !== null) closeDelivery();
    else if (state.tab === "dlq" && state.selectedLetter !== null) closeLetter();
    else if (state.tab === "vehicles" && state.selectedVehicle !== null) closeVehicle();
  });
  poll();
});
