// Operator: the spend log (/spend/logs) with the API's filters, newest first, and a request-id
// search that shows one request's full record.

import {describe, get, keyFilter} from "./api.js";
import {rangeArgs} from "./usage.js";
import {announce, dataTable, facts, field, fmtInt, fmtMoney, fmtTime, h, input, openDialog, select} from "./dom.js";

export const title = "Logs";

const state = {key: "", key_alias: "", end_user: "", start: "", end: "", size: "50", page: 1};

const RECORD_ORDER = ["request_id", "start_time_iso", "end_time_iso", "caller", "key_alias", "token", "end_user",
  "model", "method", "route", "status", "upstream_status", "error", "prompt_tokens", "completion_tokens",
  "total_tokens", "spend", "ttfb_ms", "duration_ms", "stream", "estimated", "id"];

function shown(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** One log entry, every field (known ones first). */
export function showRecords(entries, requestId) {
  const blocks = entries.map((entry, i) => {
    const names = [...RECORD_ORDER.filter((n) => n in entry), ...Object.keys(entry).filter((n) => !RECORD_ORDER.includes(n)).sort()];
    return h("section", {class: "record", "aria-label": `Log entry ${i + 1} of ${entries.length}`},
      entries.length > 1 ? h("h3", null, `Entry ${i + 1} of ${entries.length}`) : null,
      facts(names.map((n) => [n, shown(entry[n])]), "facts record-facts"));
  });
  const ok = h("button", {type: "button", onclick: () => close()}, "Close");
  const {close} = openDialog({title: `Request ${requestId}`, wide: true, initialFocus: ok, actions: [ok],
    body: h("div", {id: "request-record"}, entries.length > 1
      ? h("p", null, `${entries.length} requests were logged under this id (a caller may reuse one).`) : null, blocks)});
}

export async function render(root, ctx) {
  const controls = {
    key: input({id: "logs-key", value: state.key}),
    key_alias: input({id: "logs-alias", value: state.key_alias}),
    end_user: input({id: "logs-end-user", value: state.end_user}),
    start: input({type: "date", id: "logs-start", value: state.start}),
    end: input({type: "date", id: "logs-end", value: state.end}),
    size: select([["50", "50"], ["100", "100"], ["500", "500"]], {id: "logs-size", value: state.size}),
  };
  const filters = h("form", {class: "toolbar", "aria-label": "Log filters", onsubmit: (event) => {
    event.preventDefault();
    for (const name of Object.keys(controls)) state[name] = controls[name].value.trim();
    state.page = 1;
    load();
  }},
  field("Key or token", controls.key, "A key (sk-…) is turned into its token in this browser."),
  field("Key alias", controls.key_alias), field("End user", controls.end_user),
  field("From (UTC day)", controls.start), field("To (UTC day)", controls.end),
  field("Entries per page", controls.size), h("button", {type: "submit"}, "Filter"));

  const requestInput = input({id: "logs-request-id"});
  const finder = h("form", {class: "toolbar", role: "search", "aria-label": "Find a request", onsubmit: async (event) => {
    event.preventDefault();
    const id = requestInput.value.trim();
    if (!id) {
      announce("Enter a request id.", "error");
      requestInput.focus();
      return;
    }
    try {
      const data = await get("/spend/logs", {request_id: id, size: 500});
      if (!data.logs.length) {
        announce(`No request ${id} in the spend log.`, "error");
        return;
      }
      showRecords(data.logs, id);
    } catch (error) {
      announce(describe(error), "error");
    }
  }}, field("Request id", requestInput, "The X-Request-Id of a response."), h("button", {type: "submit"}, "Find request"));

  const list = h("div", {id: "logs-list"});
  const pager = h("nav", {class: "pager", "aria-label": "Pages of the log"});
  root.append(finder, filters, list, pager);

  async function load() {
    const current = ctx.fresh("load");  // a later call of it wins
    list.setAttribute("aria-busy", "true");
    try {
      const data = await get("/spend/logs", {key: await keyFilter(state.key), key_alias: state.key_alias, end_user: state.end_user,
        ...rangeArgs(state.start, state.end), page: state.page, size: state.size});
      if (!current()) return;
      show(data);
    } catch (error) {
      if (!current()) return;
      list.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
      pager.replaceChildren();
    } finally {
      list.removeAttribute("aria-busy");
    }
  }

  function show(data) {
    const logs = Array.isArray(data.logs) ? data.logs : [];
    list.replaceChildren(dataTable("Spend log, newest first", [
      {label: "Time", rowHeader: true, cell: (e) => fmtTime(e.start_time_iso)},
      {label: "Request id", cell: (e) => h("button", {type: "button", class: "link mono",
        "aria-label": `Record of request ${e.request_id}`, onclick: () => showRecords([e], e.request_id)}, e.request_id || "—")},
      {label: "Caller", cell: (e) => e.key_alias || e.caller},
      {label: "End user", cell: (e) => e.end_user},
      {label: "Model", cell: (e) => e.model},
      {label: "Route", cell: (e) => `${e.method || ""} ${e.route || ""}`.trim()},
      {label: "Status", numeric: true, cell: (e) => e.status},
      {label: "Tokens in / out", numeric: true, cell: (e) => `${fmtInt(e.prompt_tokens || 0)} / ${fmtInt(e.completion_tokens || 0)}`},
      {label: "Spend", numeric: true, cell: (e) => fmtMoney(e.spend || 0)},
      {label: "Duration (ms)", numeric: true, cell: (e) => (e.duration_ms === undefined ? null : fmtInt(e.duration_ms))},
    ], logs, {empty: "No request matches.", className: "logs-table"}));
    const prev = h("button", {type: "button", disabled: state.page <= 1, onclick: () => { state.page -= 1; load(); }}, "Previous page");
    const next = h("button", {type: "button", disabled: !data.has_more, onclick: () => { state.page += 1; load(); }}, "Next page");
    pager.replaceChildren(prev, h("span", {class: "muted"}, `Page ${state.page}`), next);
  }

  await load();
}
