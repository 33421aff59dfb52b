// spear web view: plain JavaScript, no build step, no external assets. It only calls the HTTP API
// (the same routes any client uses) and follows Server-Sent Events read with fetch(), so a
// bearer token works for streams too. Pages: #/executions, #/executions/<id>, #/tasks, #/workers.
"use strict";

const TERMINAL = new Set(["completed", "failed", "timed_out", "cancelled"]);
const STATUSES = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"];
const POLL_MS = 1000; // the executions page lists again at most this often
const PAGE_SIZE = 25;

// --- small helpers ------------------------------------------------------------------------------

// Text as it is, with its bidirectional controls shown by name instead of obeyed: a message
// "invoice_\u202Efdp.exe" read "invoice_exe.pdf" (probe34).
const BIDI_CONTROLS = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/g;
function visible(text) {
  return text.replace(BIDI_CONTROLS, (c) => `\u27E8U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}\u27E9`);
}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") el.style.cssText = value; // CSSOM: allowed by the page's CSP
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(visible(String(child))));
  }
  return el;
}

const shortStatus = (status) => (status || "").replace("EXECUTION_STATUS_", "");
const statusBadge = (status) => {
  const name = shortStatus(status);
  return h("span", { class: `badge s-${name.toLowerCase()}`, "data-status": name }, name.toLowerCase());
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const json = (value) => JSON.stringify(value, null, 2);

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const minutes = Math.floor(ms / 60000);
  const seconds = Math.round((ms % 60000) / 1000);
  return seconds ? `${minutes} min ${seconds} s` : `${minutes} min`;
}

function ago(iso) {
  if (!iso) return "–";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleString();
}
const timeCell = (iso) => h("span", { class: "reltime", "data-at": iso || "", title: iso || "" }, ago(iso));
// A running execution's duration, counted on by the ticker until the next refresh replaces it.
const elapsedCell = (iso) => h("span", { class: "elapsed", "data-since": iso }, duration(Date.now() - Date.parse(iso)));

function tick() {
  document.querySelectorAll(".reltime").forEach((el) => { el.textContent = ago(el.dataset.at); });
  document.querySelectorAll(".elapsed").forEach((el) => { el.textContent = duration(Date.now() - Date.parse(el.dataset.since)); });
}

// `code` spans in descriptions (docstrings use them), as text nodes: nothing is parsed as HTML.
const prose = (text) => (text || "").split("`").map((part, i) => (i % 2 ? h("code", {}, part) : part));
const localTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

function toast(message, kind, link) {
  const box = h("div", { class: `toast ${kind || ""}`, role: "status" }, message, link ? [" ", link] : []);
  document.getElementById("toasts").append(box);
  setTimeout(() => box.remove(), 6000);
}

function query() {
  const hash = location.hash.replace(/^#/, "") || "/executions";
  const [path, search] = hash.split("?");
  return { path, params: new URLSearchParams(search || "") };
}

function go(path, params) {
  const search = params && [...params].length ? `?${params}` : "";
  location.hash = `#${path}${search}`;
}

// --- the API --------------------------------------------------------------------------------------

// A token is printable ASCII (spear's are `spear_` and base64url): one that is not cannot go in a
// header, and every request then failed before it was sent, the token bar never shown again
// (probe34: a pasted "…"). Such a one is refused when pasted, and dropped if found stored.
const TOKEN_TEXT = /^[\x21-\x7E]+$/;
const token = {
  get: () => {
    const stored = localStorage.getItem("spear.token") || "";
    if (stored && !TOKEN_TEXT.test(stored)) {
      localStorage.removeItem("spear.token");
      askForToken();
      return "";
    }
    return stored;
  },
  set: (value) => localStorage.setItem("spear.token", value),
};

function headers(extra) {
  const all = { ...(extra || {}) };
  const current = token.get();
  if (current) all.Authorization = `Bearer ${current}`;
  return all;
}

// JSON as the server wrote it: an integer beyond 2^53 keeps its digits (JSON.rawJSON, where the
// browser has it) instead of being rounded (probe34: 9007199254740993 was shown ...992).
const LOSSLESS = typeof JSON.rawJSON === "function";
function parseJson(text) {
  if (!LOSSLESS) return JSON.parse(text);
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)
      ? JSON.rawJSON(context.source)
      : value);
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

// A refused request (`success: false`) is thrown as an ApiError carrying its message, unless
// `refusalAnswers`: the invoke and cancel forms show the refusal's own reply.
async function api(path, options, refusalAnswers = false) {
  const init = { ...(options || {}) };
  init.headers = headers(init.body ? { "Content-Type": "application/json" } : {});
  if (init.body && typeof init.body !== "string") init.body = JSON.stringify(init.body);
  const response = await fetch(path, init);
  let body = null;
  try {
    body = parseJson(await response.text());
  } catch (error) {
    body = null;
  }
  if (response.status === 401 || response.status === 403) askForToken();
  const refused = body && body.success === false;
  if ((refused && !refusalAnswers) || (!response.ok && !(body && (body.found === false || refused || body.status)))) {
    throw new ApiError(response.status, body);
  }
  return { status: response.status, body };
}

function askForToken() {
  const bar = document.getElementById("token-bar");
  bar.hidden = false;
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header). Reconnects
// with Last-Event-ID; `once` streams (one execution) stop after its terminal event, and only then.
function follow(path, { onEvent, onState, onEnd, once }) {
  const control = new AbortController();
  let last = "";
  let stopped = false;
  let finished = false; // a terminal event came: a `once` stream has nothing more to say
  (async () => {
    while (!stopped) {
      let ended = false;
      try {
        const response = await fetch(path, {
          headers: headers({ Accept: "text/event-stream", ...(last ? { "Last-Event-ID": last } : {}) }),
          signal: control.signal,
        });
        if (response.status === 401 || response.status === 403) askForToken();
        if (response.status >= 400 && response.status < 500 && response.status !== 401 && response.status !== 403) {
          if (onEnd) onEnd(); // refused for good (not found, bad request): asking again will not help
          return;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        if (onState) onState(true);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const frame = parseFrame(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
            if (frame) {
              last = frame.id || last;
              finished = finished || TERMINAL.has(frame.event);
              onEvent(frame);
            }
          }
        }
        ended = true;
      } catch (error) {
        if (stopped) return;
      }
      if (once && ended && finished) {
        if (onEnd) onEnd(); // the execution ended: there is nothing more to follow
        return;
      }
      // Ended without the terminal event (the server stopped, say): follow again from the last one.
      if (onState) onState(false);
      await sleep(1500);
    }
  })();
  return () => {
    stopped = true;
    control.abort();
  };
}

function parseFrame(text) {
  const frame = { id: "", event: "message", data: "" };
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const key = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (key === "data") frame.data += value;
    else if (key === "id" || key === "event") frame[key] = value;
  }
  if (!frame.data) return null;
  try {
    frame.data = parseJson(frame.data);
  } catch (error) {
    return null;
  }
  return frame;
}

function setLive(on) {
  const pill = document.getElementById("live");
  pill.hidden = false;
  pill.className = `pill ${on ? "ok" : "warn"}`;
  pill.querySelector(".label").textContent = on ? "live" : "reconnecting";
}

// --- executions list ----------------------------------------------------------------------------

let taskCache = null;
async function tasks() {
  if (!taskCache) taskCache = (await api("/api/v1/tasks?include_details=false&limit=1000")).body.tasks || [];
  return taskCache;
}

function filterSelect(id, label, options, value, onChange) {
  const select = h(
    "select",
    { class: "select", id, onchange: (event) => onChange(event.target.value) },
    h("option", { value: "" }, "any"),
    options.map((option) => h("option", { value: option, selected: option === value }, option.toLowerCase ? option : option)),
  );
  return h("div", { class: "field" }, h("label", { for: id }, label), select);
}

async function executionsPage(root, params) {
  const filters = {
    task: params.get("task") || "",
    function: params.get("function") || "",
    status: params.get("status") || "",
  };
  const cursors = (executionsPage.cursors = executionsPage.cursors || []);
  const after = params.get("after") || "";
  if (!after) cursors.length = 0;
  const known = new Map();
  const highlight = params.get("new") || "";

  const setFilter = (key, value) => {
    const next = new URLSearchParams();
    const merged = { ...filters, [key]: value };
    if (key === "task") merged.function = "";
    for (const [name, val] of Object.entries(merged)) if (val) next.set(name, val);
    cursors.length = 0;
    go("/executions", next);
  };

  const taskList = await tasks().catch(() => []);
  const functions = (taskList.find((t) => t.task_id === filters.task) || { functions: [] }).functions.map((f) => f.name);
  const body = h("tbody", {});
  const info = h("span", { class: "subtle" });
  const newer = h("button", { class: "btn btn-sm", id: "page-newer" }, "← Newer");
  const older = h("button", { class: "btn btn-sm", id: "page-older" }, "Older →");
  let nextCursor = "";
  newer.addEventListener("click", () => {
    const next = new URLSearchParams(params);
    const previous = cursors.pop();
    if (previous) next.set("after", previous);
    else next.delete("after");
    go("/executions", next);
  });
  older.addEventListener("click", () => {
    const next = new URLSearchParams(params);
    cursors.push(after);
    next.set("after", nextCursor);
    next.delete("new");
    go("/executions", next);
  });

  root.replaceChildren(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Executions"),
      h("span", { class: "subtle" }, "newest first, updated live"),
      filters.task || filters.function || filters.status
        ? h("a", { href: "#/executions", id: "clear-filters" }, "clear filters")
        : null,
      h("span", { class: "spacer" }),
      h("a", { class: "btn btn-primary", href: "#/tasks" }, "Invoke a function"),
    ),
    h(
      "div",
      { class: "filters" },
      filterSelect("filter-task", "Task", taskList.map((t) => t.task_id), filters.task, (v) => setFilter("task", v)),
      filterSelect("filter-function", "Function", functions, filters.function, (v) => setFilter("function", v)),
      filterSelect("filter-status", "Status", STATUSES, filters.status, (v) => setFilter("status", v)),
    ),
    h(
      "div",
      { class: "card" },
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { id: "executions" },
          h(
            "thead",
            {},
            h("tr", {}, h("th", {}, "Status"), h("th", {}, "Function"), h("th", {}, "Execution"),
              h("th", {}, "Requested"), h("th", { class: "num" }, "Duration"), h("th", { class: "num" }, "Attempt")),
          ),
          body,
        ),
      ),
      h("div", { class: "pager" }, info, newer, older),
    ),
  );

  async function refresh() {
    const search = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (filters.task) search.set("task_id", filters.task);
    if (filters.function) search.set("function_name", filters.function);
    if (filters.status) search.set("status", filters.status);
    if (after) search.set("start_after", after);
    let page;
    try {
      page = (await api(`/api/v1/executions?${search}`)).body;
    } catch (error) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "empty" }, `Could not list executions: ${error.message}`)));
      return false;
    }
    nextCursor = page.next_start_after || "";
    older.disabled = !page.has_more;
    newer.disabled = !after;
    info.textContent = page.executions.length ? `${page.executions.length} shown${page.has_more ? ", more older" : ""}` : "";
    if (!page.executions.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No executions yet. Invoke a function from the Tasks page.")));
      return true;
    }
    body.replaceChildren(
      ...page.executions.map((e) => {
        const status = shortStatus(e.status);
        const changed = known.has(e.execution_id) ? known.get(e.execution_id) !== status : known.size > 0 || e.execution_id === highlight;
        known.set(e.execution_id, status);
        const open = () => go(`/executions/${e.execution_id}`);
        return h(
          "tr",
          { class: `link${changed ? " flash" : ""}`, onclick: open, dataset: { id: e.execution_id, status } },
          h("td", {}, statusBadge(e.status)),
          h("td", {}, h("span", { class: "subtle" }, `${e.task_id}.`), h("strong", {}, e.function_name)),
          h("td", {}, h("a", { class: "mono", href: `#/executions/${e.execution_id}` }, e.execution_id)),
          h("td", {}, timeCell(e.requested_at)),
          h("td", { class: "num" }, e.completed_at ? duration(e.execution_time_ms) : e.started_at ? elapsedCell(e.started_at) : "–"),
          h("td", { class: "num" }, e.attempt ? `${e.attempt}/${e.max_retries + 1}` : "–"),
        );
      }),
    );
    return true;
  }

  // Poll the page rather than follow the event feed: the feed carries every event through the
  // server and the browser only to say "something changed" (under 5,000 calls a second, 15,000
  // events a second, and an open page took the gateway's CPU from the calls), while a listing
  // costs the same at any rate. Polls are spaced by four times their own cost (a filtered listing
  // over many executions is slow) and wait while the tab is hidden.
  let timer = null;
  let stopped = false;
  let busy = false;
  const poll = async () => {
    timer = null;
    if (stopped || busy || document.hidden) return;
    busy = true;
    const began = performance.now();
    let ok = false;
    try {
      ok = await refresh();
    } catch (error) {
      ok = false; // an answer the page could not show: it is listed again at the next poll
    } finally {
      busy = false;
    }
    // Left meanwhile (the router calls the page's cleanup only once its first listing is in):
    // nothing more to show or to ask for.
    if (stopped || !body.isConnected) return;
    setLive(ok);
    timer = setTimeout(poll, Math.max(POLL_MS, 4 * (performance.now() - began)));
  };
  const visible = () => { if (!timer) poll(); };
  document.addEventListener("visibilitychange", visible);
  await poll();
  const ticker = setInterval(tick, 1000);
  return () => {
    stopped = true;
    clearTimeout(timer);
    clearInterval(ticker);
    document.removeEventListener("visibilitychange", visible);
  };
}

// --- one execution ------------------------------------------------------------------------------

function describe(event) {
  switch (event.type) {
    case "requested":
      return `${event.execution_mode.replace("EXECUTION_MODE_", "").toLowerCase()} call accepted` +
        (event.timeout_ms ? `, time limit ${duration(event.timeout_ms)}` : "") +
        (event.max_retries ? `, up to ${event.max_retries} retries` : "");
    case "started":
      return `attempt ${event.attempt} started${event.worker_id ? ` on ${event.worker_id}` : ""}`;
    case "log":
      return event.progress === null || event.progress === undefined
        ? event.message
        : `${Math.round(event.progress * 100)}%${event.message ? ` · ${event.message}` : ""}`;
    case "retrying":
      return `attempt ${event.attempt} ${shortStatus(event.result.status).toLowerCase()}: ${event.result.error_message || event.reason}; next in ${duration(event.delay_ms)}`;
    case "released":
      return `attempt ${event.attempt} handed back (${event.reason || "worker stopping"}); it runs again`;
    case "cancel_requested":
      return `cancellation requested${event.reason ? `: ${event.reason}` : ""}${event.force ? " (force)" : ""}`;
    case "chunk":
      return `chunk ${event.seq}: ${typeof event.data === "string" ? event.data : JSON.stringify(event.data)}`;
    default:
      if (event.result) {
        const r = event.result;
        if (!r.error_message) return `returned after ${duration(r.execution_time_ms)}`;
        return event.type === "failed" ? `${r.error_code}: ${r.error_message}` : r.error_message;
      }
      return "";
  }
}

async function executionPage(root, id) {
  const events = [];
  const status = h("span", {});
  const title = h("h1", {}, id);
  const cancel = h("button", { class: "btn btn-danger", id: "cancel", hidden: true }, "Cancel");
  const force = h("button", { class: "btn btn-danger", id: "force-cancel", hidden: true }, "Force cancel");
  const notice = h("div", { class: "notice", hidden: true });
  const summary = h("dl", { class: "kv" });
  const progress = h("div", { hidden: true }, h("div", { class: "progress" }, h("span", { style: "width:0%" })), h("div", { class: "progress-label" }));
  const parameters = h("pre", { class: "code", id: "parameters" }, "…");
  const outcome = h("div", { id: "outcome" }, h("p", { class: "subtle" }, "No result yet."));
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const logs = h("ul", { class: "logs", id: "logs" });
  const logsCard = h("div", { class: "card", hidden: true }, h("div", { class: "card-head" }, h("h2", {}, "Logs")), h("div", { class: "card-body" }, logs));

  root.replaceChildren(
    h("div", { class: "page-head" }, h("a", { href: "#/executions", class: "subtle" }, "← Executions")),
    h("div", { class: "page-head" }, title, status, h("span", { class: "spacer" }), force, cancel),
    notice,
    h(
      "div",
      { class: "grid-2" },
      h("div", { class: "stack" },
        h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Summary")), h("div", { class: "card-body" }, summary, progress)),
        h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Parameters")), h("div", { class: "card-body" }, parameters)),
        h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Result")), h("div", { class: "card-body" }, outcome)),
      ),
      h("div", { class: "stack" },
        h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Timeline"), h("span", { class: "spacer" }), h("span", { class: "subtle" }, "since requested")), h("div", { class: "card-body" }, timeline)),
        logsCard,
      ),
    ),
  );

  async function doCancel(withForce) {
    cancel.disabled = force.disabled = true;
    try {
      const { body } = await api(
        `/api/v1/executions/${id}/cancel`,
        { method: "POST", body: { reason: "from the web view", force: withForce } },
        true,
      );
      notice.hidden = false;
      notice.className = body.success ? "notice" : "notice err";
      notice.textContent = visible(body.message.replace(/EXECUTION_STATUS_(\w+)/g, (_, name) => name.toLowerCase()));
      force.hidden = !(body.success && shortStatus(body.final_status) === "RUNNING");
    } catch (error) {
      notice.hidden = false;
      notice.className = "notice err";
      notice.textContent = visible(error.message);
    }
    cancel.disabled = force.disabled = false;
    soon();
  }
  cancel.addEventListener("click", () => doCancel(false));
  force.addEventListener("click", () => doCancel(true));

  function renderStatus(reply) {
    if (!reply.found) {
      title.textContent = "Not found";
      notice.hidden = false;
      notice.className = "notice err";
      notice.textContent = visible(reply.message);
      return;
    }
    const e = reply.execution;
    const r = reply.result || {};
    title.replaceChildren(h("span", { class: "subtle" }, `${e.task_id}.`), e.function_name);
    status.replaceChildren(statusBadge(e.status));
    const terminal = ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"].includes(shortStatus(e.status));
    cancel.hidden = terminal;
    if (terminal) force.hidden = true;
    const rows = [
      ["Execution", h("span", { class: "mono" }, e.execution_id)],
      ["Mode", e.execution_mode.replace("EXECUTION_MODE_", "").toLowerCase()],
      ["Attempt", e.attempt ? `${e.attempt} of ${e.max_retries + 1}` : "not started"],
      ["Time limit", e.timeout_ms ? duration(e.timeout_ms) : "default"],
      ["Worker", e.worker_id || "–"],
      ["Requested", localTime(e.requested_at)],
      ["Started", localTime(e.started_at)],
      ["Ended", localTime(e.completed_at)],
      ["Duration", terminal ? duration(r.execution_time_ms ?? e.execution_time_ms) : e.started_at ? elapsedCell(e.started_at) : "–"],
    ];
    summary.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { id: `summary-${k.toLowerCase().replace(" ", "-")}` }, v)]));
    const metrics = r.metrics || {};
    if (terminal) progress.hidden = true; // the result says the rest
    else if (metrics.progress !== undefined && !Number.isNaN(parseFloat(metrics.progress)))
      showProgress(parseFloat(metrics.progress), metrics.progress_message, e.attempt); // the wire says "0.5"
    if (terminal) {
      outcome.replaceChildren(
        r.error_code
          ? h("pre", { class: "code error", id: "error" }, `${r.error_code}\n${r.error_message}`)
          : h("pre", { class: "code", id: "result" }, json(r.result)),
      );
    } else if (r.error_message) {
      outcome.replaceChildren(h("p", { class: "subtle" }, `Last attempt failed: ${r.error_message}; retrying.`));
    }
  }

  // The newest progress shown, of the newest attempt: the status and the event stream both report
  // it; a retried attempt starts again from 0 (probe34: attempt 2 stayed hidden behind 1's 90%).
  let shown = -1;
  let shownAttempt = 0;
  function showProgress(fraction, message, attempt) {
    if (attempt > shownAttempt) [shown, shownAttempt] = [-1, attempt];
    else if (attempt < shownAttempt) return;
    if (fraction < shown) return;
    shown = fraction;
    const percent = `${Math.round(fraction * 100)}%`;
    progress.hidden = false;
    progress.querySelector(".progress > span").style.width = percent;
    progress.querySelector(".progress-label").replaceChildren(h("span", {}, message || ""), h("span", {}, percent));
  }

  function addEvent(event) {
    events.push(event);
    const start = Date.parse(events[0].at);
    const offset = Date.parse(event.at) - start;
    const isProgress = event.type === "log" && typeof event.progress === "number";
    const previous = timeline.lastElementChild;
    if (isProgress && previous && previous.dataset.progress) previous.remove(); // one row for a run of reports
    timeline.append(
      h("li", { dataset: isProgress ? { kind: event.type, progress: "1" } : { kind: event.type } },
        h("span", { class: "at", title: event.at }, `+${duration(offset)}`),
        h("strong", { class: `k-${event.type}` }, isProgress ? "progress" : event.type.replace("_", " ")),
        h("span", { class: "what" }, describe(event))),
    );
    if (event.type === "requested") parameters.textContent = visible(json(event.parameters || {}));
    if (isProgress && !TERMINAL.has(events[events.length - 2]?.type)) showProgress(event.progress, event.message, event.attempt);
    if (event.type === "log" && (event.progress === null || event.progress === undefined)) {
      logsCard.hidden = false;
      logs.append(h("li", {}, h("span", { class: "at" }, new Date(event.at).toLocaleTimeString()), event.message));
    }
  }

  let timer = null;
  const refresh = async () => {
    try {
      renderStatus((await api(`/api/v1/executions/${id}`)).body);
    } catch (error) {
      notice.hidden = false;
      notice.className = "notice err";
      notice.textContent = visible(error.message);
    }
  };
  const soon = () => {
    if (!timer) timer = setTimeout(() => { timer = null; refresh(); }, 150);
  };
  await refresh();
  const stop = follow(`/api/v1/executions/${id}/events`, {
    once: true,
    onEvent: (frame) => {
      addEvent(frame.data);
      soon();
    },
    onState: setLive,
    onEnd: () => { document.getElementById("live").hidden = true; },
  });
  const ticker = setInterval(tick, 1000);
  return () => { stop(); clearTimeout(timer); clearInterval(ticker); };
}

// --- tasks and the invoke form ------------------------------------------------------------------

function signature(fn) {
  const typed = (p) => (p.type && p.type !== "Any" ? `: ${p.type}` : "");
  const parts = fn.parameters.map((p) => `${p.name}${typed(p)}${p.required ? "" : " = …"}`);
  if (fn.accepts_any) parts.push(`**${fn.var_keyword || "kwargs"}`);  // (its own name: probe66)
  return parts;
}

// A declared type of text (the annotation's text, as the task's description shows it): a value
// typed for such a parameter is text even where it reads as JSON (`42` for `email: str`), as
// `spear invoke` sends it; the worker takes values at their declared types (review53).
const TEXT_TYPE = /^(?:typing\.)?(?:str|str \| None|None \| str|Optional\[str\]|Union\[(?:str, ?None|None, ?str)\]|Annotated\[str,.*\])$/;

function invokeForm(task, fn, onClose) {
  const inputs = fn.parameters.map((p) => {
    const id = `param-${fn.name}-${p.name}`;
    return {
      p,
      input: h("input", { class: "input mono", id, name: p.name, placeholder: p.required ? "required (JSON or text)" : "optional", autocomplete: "off" }),
      label: h("label", { for: id }, p.name, p.required ? h("span", { class: "req" }, "*") : null, p.type && p.type !== "Any" ? h("span", { class: "subtle" }, ` ${p.type}`) : null),
    };
  });
  const extra = fn.accepts_any ? h("textarea", { class: "input", id: `extra-${fn.name}`, placeholder: '{"other": "parameters"}' }) : null;
  const mode = h("select", { class: "select", id: `mode-${fn.name}` },
    fn.streaming ? h("option", { value: "STREAM" }, "stream: chunks as they come") : null,
    h("option", { value: "ASYNC" }, "async: follow it live"),
    h("option", { value: "SYNC" }, "sync: wait for the result"));
  const timeout = h("input", { class: "input", id: `timeout-${fn.name}`, type: "number", min: "0", placeholder: fn.timeout_ms ? String(fn.timeout_ms) : "default" });
  const message = h("div", { class: "notice err", hidden: true });
  const submit = h("button", { class: "btn btn-primary", type: "submit" }, `Invoke ${fn.name}`);

  const form = h("form", { class: "invoke-form", "data-function": fn.name },
    inputs.length ? h("div", { class: "fields" }, inputs.map(({ input, label }) => h("div", { class: "field" }, label, input))) : h("p", { class: "subtle" }, "This function takes no parameters."),
    extra ? h("div", { class: "field" }, h("label", { for: extra.id }, "More parameters (a JSON object)"), extra) : null,
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: mode.id }, "Mode"), mode),
      h("div", { class: "field" }, h("label", { for: timeout.id }, "Time limit (ms)"), timeout)),
    message,
    h("div", { class: "row" }, submit, h("button", { class: "btn", type: "button", onclick: onClose }, "Close")),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hidden = true;
    const parameters = [];
    for (const { p, input } of inputs) {
      const text = input.value.trim();
      if (!text) {
        if (p.required) return fail(`${p.name} is required`);
        continue;
      }
      let value = text;
      try { value = JSON.parse(text); } catch (error) { value = text; }
      if (typeof value !== "string" && value !== null && TEXT_TYPE.test(p.type || "")) value = text;
      parameters.push({ name: p.name, value });
    }
    if (extra && extra.value.trim()) {
      let more;
      try { more = JSON.parse(extra.value); } catch (error) { return fail("More parameters must be a JSON object"); }
      if (typeof more !== "object" || more === null || Array.isArray(more)) return fail("More parameters must be a JSON object");
      for (const [name, value] of Object.entries(more)) parameters.push({ name, value });
    }
    const request = { task_id: task.task_id, function_name: fn.name, parameters, execution_mode: mode.value };
    if (timeout.value) request.context = { timeout_ms: Number(timeout.value) };
    submit.disabled = true;
    try {
      const { body } = await api("/api/v1/invoke", { method: "POST", body: request }, true);
      if (!body.success && !body.execution_id) return fail(body.message);
      const link = h("a", { href: `#/executions/${body.execution_id}` }, "open");
      toast(`${task.task_id}.${fn.name} invoked: ${shortStatus(body.result && body.result.status).toLowerCase() || body.message}`, "", link);
      go("/executions", new URLSearchParams({ new: body.execution_id }));
    } catch (error) {
      fail(error.message);
    } finally {
      submit.disabled = false;
    }
  });

  function fail(text) {
    message.hidden = false;
    message.textContent = visible(text);
  }
  return form;
}

async function tasksPage(root) {
  taskCache = null;
  const list = (await api("/api/v1/tasks?include_details=true&limit=1000")).body.tasks || [];
  taskCache = list;
  root.replaceChildren(
    h("div", { class: "page-head" }, h("h1", {}, "Tasks"), h("span", { class: "subtle" }, `${list.length} registered`)),
    list.length ? h("div", { class: "stack" }, list.map(taskCard)) : h("div", { class: "card empty" }, "No task is registered: start a worker."),
  );
}

function taskCard(task) {
  const rows = h("tbody", {});
  for (const fn of task.functions) {
    const slot = h("tr", { hidden: true }, h("td", { colspan: 4, style: "padding:0" }));
    const open = h("button", { class: "btn btn-sm", "data-invoke": fn.name }, "Invoke…");
    open.addEventListener("click", () => {
      if (!slot.hidden) { slot.hidden = true; return; }
      slot.firstChild.replaceChildren(invokeForm(task, fn, () => { slot.hidden = true; }));
      slot.hidden = false;
      const first = slot.querySelector("input, textarea, select");
      if (first) first.focus();
    });
    rows.append(
      h("tr", { class: "fn-row" },
        h("td", {}, h("div", { class: "fn-name" }, fn.name), fn.streaming ? h("span", { class: "badge plain" }, "stream") : null),
        h("td", {}, h("div", { class: "params" }, signature(fn).map((s) => h("span", { class: "chip" }, s)))),
        h("td", { class: "subtle" }, prose(fn.description)),
        h("td", { class: "num" }, open)),
      slot,
    );
  }
  return h("div", { class: "card", "data-task": task.task_id },
    h("div", { class: "card-head" },
      h("h2", {}, task.task_id),
      task.description ? h("span", { class: "subtle" }, "· ", prose(task.description)) : null,
      h("span", { class: "spacer" }),
      h("a", { class: "subtle", href: `#/executions?task=${encodeURIComponent(task.task_id)}` }, `${task.execution_count} execution${task.execution_count === 1 ? "" : "s"}`),
      task.last_status && task.last_status !== "EXECUTION_STATUS_UNKNOWN" ? statusBadge(task.last_status) : null),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Function"), h("th", {}, "Parameters"), h("th", {}, "Description"), h("th", {}, ""))),
      rows)));
}

// --- workers --------------------------------------------------------------------------------------

async function workersPage(root) {
  const body = h("tbody", {});
  const count = h("span", { class: "subtle" });
  root.replaceChildren(
    h("div", { class: "page-head" }, h("h1", {}, "Workers"), count),
    h("div", { class: "card" }, h("div", { class: "table-wrap" }, h("table", { id: "workers" },
      h("thead", {}, h("tr", {}, h("th", {}, "Worker"), h("th", {}, "Tasks"), h("th", {}, "Running"), h("th", {}, "Instance"), h("th", {}, "Version"))),
      body))),
  );
  async function refresh() {
    let reply;
    try {
      reply = (await api("/api/v1/workers")).body;
    } catch (error) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "empty" }, error.message)));
      return;
    }
    count.textContent = `${reply.workers.length} running`;
    if (!reply.workers.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No worker answers. Start one with `spear worker`.")));
      return;
    }
    body.replaceChildren(...reply.workers.map((w) => h("tr", { dataset: { worker: w.worker_id } },
      h("td", {}, h("strong", {}, w.worker_id)),
      h("td", {}, h("div", { class: "params" }, w.tasks.map((t) => h("a", { class: "chip", href: `#/executions?task=${encodeURIComponent(t)}` }, t)))),
      h("td", {}, w.running_executions.length
        ? h("div", { class: "params" }, w.running_executions.map((id) => h("a", { class: "id-link", href: `#/executions/${id}` }, id)))
        : h("span", { class: "subtle" }, "idle")),
      h("td", { class: "mono" }, w.instance_id),
      h("td", { class: "subtle" }, w.version))));
  }
  await refresh();
  const timer = setInterval(refresh, 3000);
  return () => clearInterval(timer);
}

// --- shell: router, health, token -----------------------------------------------------------------

let cleanup = null;
let rendering = 0;

async function render() {
  const turn = ++rendering;
  if (cleanup) { cleanup(); cleanup = null; }
  document.getElementById("live").hidden = true; // shown again by a page that follows a stream
  const { path, params } = query();
  // Each render draws into a container of its own: one the user has left, still awaiting its
  // data, then draws into a container no longer shown, not over the page now open (probe34).
  const root = h("div", { class: "page" });
  document.getElementById("app").replaceChildren(root);
  const section = path.split("/")[1] || "executions";
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
  document.title = `spear · ${section}`;
  let done;
  try {
    const match = path.match(/^\/executions\/([A-Za-z0-9_-]{1,128})$/);
    if (match) done = await executionPage(root, match[1]);
    else if (section === "tasks") done = await tasksPage(root);
    else if (section === "workers") done = await workersPage(root);
    else done = await executionsPage(root, params);
  } catch (error) {
    root.replaceChildren(h("div", { class: "card empty" }, `Could not load this page: ${error.message}`));
  }
  if (turn !== rendering) { if (done) done(); return; }
  cleanup = done || null;
}

async function health() {
  const pill = document.getElementById("health");
  try {
    const { body } = await api("/api/v1/health");
    const kind = { healthy: "ok", degraded: "warn" }[body.status] || "err";
    pill.className = `pill ${kind}`;
    pill.querySelector(".label").textContent = body.status;
    pill.title = body.message;
  } catch (error) {
    pill.className = "pill err";
    pill.querySelector(".label").textContent = "unreachable";
  }
}

document.getElementById("token-input").addEventListener("input", (event) => event.target.setCustomValidity(""));
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  const value = input.value.trim();
  if (value && !TOKEN_TEXT.test(value)) {
    input.setCustomValidity("A token is letters, digits and punctuation only (as `spear token create` prints it).");
    input.reportValidity();
    return;
  }
  input.setCustomValidity("");
  token.set(value);
  document.getElementById("token-bar").hidden = true;
  taskCache = null;
  render();
});
window.addEventListener("hashchange", render);
render();
health();
setInterval(health, 10000);
