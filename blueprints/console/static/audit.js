// Operator: the audit log of admin changes (/audit/logs), newest first.

import {describe, get, keyFilter} from "./api.js";
import {rangeArgs} from "./usage.js";
import {dataTable, field, fmtTime, h, input, select} from "./dom.js";

export const title = "Audit";

const ACTIONS = ["generate", "update", "block", "unblock", "regenerate", "delete"];
const state = {key: "", key_alias: "", action: "", start: "", end: "", page: 1};

export async function render(root, ctx) {
  const controls = {
    key: input({id: "audit-key", value: state.key}),
    key_alias: input({id: "audit-alias", value: state.key_alias}),
    action: select([["", "Any"], ...ACTIONS.map((a) => [a, a])], {id: "audit-action", value: state.action}),
    start: input({type: "date", id: "audit-start", value: state.start}),
    end: input({type: "date", id: "audit-end", value: state.end}),
  };
  const list = h("div", {id: "audit-list"});
  const pager = h("nav", {class: "pager", "aria-label": "Pages of the audit log"});
  root.append(h("form", {class: "toolbar", "aria-label": "Audit filters", onsubmit: (event) => {
    event.preventDefault();
    for (const name of Object.keys(controls)) state[name] = controls[name].value.trim();
    state.page = 1;
    load();
  }}, field("Key or token", controls.key), field("Key alias", controls.key_alias), field("Action", controls.action),
  field("From (UTC day)", controls.start), field("To (UTC day)", controls.end), h("button", {type: "submit"}, "Filter")),
  list, pager);

  async function load() {
    const current = ctx.fresh("load");  // a later call of it wins
    list.setAttribute("aria-busy", "true");
    try {
      const data = await get("/audit/logs", {key: await keyFilter(state.key), key_alias: state.key_alias,
        action: state.action, ...rangeArgs(state.start, state.end), page: state.page, size: 50});
      if (!current()) return;
      const logs = Array.isArray(data.logs) ? data.logs : [];
      list.replaceChildren(dataTable("Admin changes, newest first", [
        {label: "Time", rowHeader: true, cell: (e) => fmtTime(e.time)},
        {label: "Action", cell: (e) => h("span", {class: `badge action-${ACTIONS.includes(e.action) ? e.action : "other"}`}, e.action)},
        {label: "Caller", cell: (e) => e.caller},
        {label: "Key alias", cell: (e) => e.key_alias},
        {label: "Token", cell: (e) => (e.token ? h("code", {title: e.token}, `${String(e.token).slice(0, 12)}…`) : null)},
        {label: "Changes", cell: (e) => h("code", {class: "wrap"}, JSON.stringify(e.changes || {}))},
        {label: "Other", cell: (e) => otherFields(e)},
      ], logs, {empty: "No admin change matches.", className: "audit-table"}));
      const pages = Math.max(Number(data.total_pages) || 1, 1);
      pager.replaceChildren(
        h("button", {type: "button", disabled: state.page <= 1, onclick: () => { state.page -= 1; load(); }}, "Previous page"),
        h("span", {class: "muted"}, `Page ${state.page} of ${pages} · ${data.total_count ?? logs.length} entries`),
        h("button", {type: "button", disabled: state.page >= pages, onclick: () => { state.page += 1; load(); }}, "Next page"));
    } catch (error) {
      if (!current()) return;
      list.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
      pager.replaceChildren();
    } finally {
      list.removeAttribute("aria-busy");
    }
  }

  await load();
}

function otherFields(entry) {
  const rest = Object.entries(entry).filter(([name]) =>
    !["id", "time", "action", "caller", "token", "key_alias", "changes"].includes(name));
  return rest.length ? h("code", {class: "wrap"}, rest.map(([n, v]) => `${n}: ${JSON.stringify(v)}`).join("; ")) : null;
}
