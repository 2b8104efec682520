// Operator: the virtual keys. One page of /key/list at a time (never every key), searched by
// alias prefix on the server; create, edit, block/unblock, regenerate and delete through /key/*.

import {describe, get, post} from "./api.js";
import {
  announce, budgetBar, confirmDialog, dataTable, facts, field, fmtInt, fmtJson, fmtList, fmtMoney, fmtTime, h,
  input, nextId, openDialog, select,
} from "./dom.js";

const state = {page: 1, size: 25, search: ""};

export const title = "Keys";

export function nameOf(record) {
  return record.key_alias || record.key_name || String(record.token || "").slice(0, 12);
}

export function statusOf(record) {
  if (record.status === "superseded") return "superseded";
  if (record.blocked) return "blocked";
  if (record.expires && Date.parse(record.expires) <= Date.now()) return "expired";
  return "active";
}

function limitsText(record) {
  const parts = [];
  if (record.rpm_limit !== null && record.rpm_limit !== undefined) parts.push(`${fmtInt(record.rpm_limit)} rpm`);
  if (record.tpm_limit !== null && record.tpm_limit !== undefined) parts.push(`${fmtInt(record.tpm_limit)} tpm`);
  if (record.max_parallel_requests !== null && record.max_parallel_requests !== undefined) {
    parts.push(`${fmtInt(record.max_parallel_requests)} parallel`);
  }
  return parts.length ? parts.join(" · ") : "none";
}

export async function render(root, ctx) {
  const searchInput = input({type: "search", id: "keys-search", value: state.search, placeholder: "alias starts with…"});
  const sizeSelect = select([["10", "10"], ["25", "25"], ["50", "50"], ["100", "100"]],
    {id: "keys-size", value: String(state.size)});
  const listArea = h("div", {id: "keys-list"});
  const pager = h("nav", {class: "pager", "aria-label": "Pages of keys"});

  const search = h("form", {class: "toolbar", role: "search", "aria-label": "Search keys", onsubmit: (event) => {
    event.preventDefault();
    state.search = searchInput.value.trim();
    state.page = 1;
    load();
  }}, field("Search by alias", searchInput), field("Keys per page", sizeSelect), h("button", {type: "submit"}, "Search"));
  sizeSelect.addEventListener("change", () => { state.size = Number(sizeSelect.value); state.page = 1; load(); });

  root.append(
    h("div", {class: "page-tools"}, search,
      h("button", {type: "button", class: "primary", id: "create-key", onclick: () => createKey(load)}, "Create key")),
    listArea, pager);

  async function load() {
    const current = ctx.fresh("load");  // a later call of it wins
    listArea.setAttribute("aria-busy", "true");
    try {
      const data = await get("/key/list", {page: state.page, size: state.size, return_full_object: "true",
        search: state.search || undefined});
      if (!current()) return;
      if (data.total_pages && state.page > data.total_pages) {  // the last page emptied (a delete)
        state.page = data.total_pages;
        return load();
      }
      showKeys(data);
    } catch (error) {
      if (!current()) return;
      listArea.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
      pager.replaceChildren();
    } finally {
      listArea.removeAttribute("aria-busy");
    }
  }

  function showKeys(data) {
    const keys = Array.isArray(data.keys) ? data.keys : [];
    const actions = (record) => {
      if (record.status === "superseded") return h("span", {class: "muted"}, "old copy");
      const name = nameOf(record);
      return h("div", {class: "row-actions"},
        h("button", {type: "button", "aria-label": `Edit ${name}`, onclick: () => editKey(record, load)}, "Edit"),
        record.blocked
          ? h("button", {type: "button", "aria-label": `Unblock ${name}`, onclick: () => setBlocked(record, false, load)}, "Unblock")
          : h("button", {type: "button", "aria-label": `Block ${name}`, onclick: () => setBlocked(record, true, load)}, "Block"),
        h("button", {type: "button", "aria-label": `Regenerate ${name}`, onclick: () => regenerateKey(record, load)}, "Regenerate"),
        h("button", {type: "button", class: "danger", "aria-label": `Delete ${name}`, onclick: () => deleteKey(record, load)}, "Delete"));
    };
    const columns = [
      {label: "Alias", rowHeader: true, cell: (r) => h("button", {type: "button", class: "link",
        "aria-label": `Details of ${nameOf(r)}`, onclick: () => keyDetails(r)}, r.key_alias || "(no alias)")},
      {label: "Key", cell: (r) => h("code", null, r.key_name || "")},
      {label: "Models", cell: (r) => fmtList(r.models, "all")},
      {label: "Limits", cell: limitsText},
      {label: "Spend / budget", cell: (r) => budgetBar(r.spend, r.max_budget, `Spend of ${nameOf(r)} against its budget`)},
      {label: "Expires", cell: (r) => fmtTime(r.expires, "never")},
      {label: "Status", cell: (r) => h("span", {class: `badge ${statusOf(r)}`},
        statusOf(r) === "superseded" && r.blocked ? "superseded, blocked" : statusOf(r))},
      {label: "Last used", cell: (r) => fmtTime(r.last_used_at, "never")},
      {label: "Actions", cell: actions},
    ];
    const caption = state.search ? `Keys whose alias starts with “${state.search}”` : "Keys, newest first";
    listArea.replaceChildren(dataTable(caption, columns, keys, {
      empty: state.search ? "No key alias starts with that." : "No keys yet.", className: "keys-table"}));

    const total = Number(data.total_count) || 0;
    const pages = Math.max(Number(data.total_pages) || 1, 1);
    const prev = h("button", {type: "button", disabled: state.page <= 1,
      onclick: () => { state.page -= 1; load(); }}, "Previous page");
    const next = h("button", {type: "button", disabled: state.page >= pages,
      onclick: () => { state.page += 1; load(); }}, "Next page");
    pager.replaceChildren(prev, h("span", {class: "muted", id: "keys-count"},
      `Page ${state.page} of ${pages} · ${fmtInt(total)} key${total === 1 ? "" : "s"}`), next);
  }

  await load();
}

// -- the key form (create and edit) ----------------------------------------------------------

const LIST_FIELDS = ["models", "allowed_routes", "tags"];
const INT_FIELDS = ["rpm_limit", "tpm_limit", "max_parallel_requests"];
const TEXT_FIELDS = ["key_alias", "budget_duration", "user_id", "team_id"];

function keyForm(record, creating) {
  const value = (name) => (record && record[name] !== null && record[name] !== undefined ? record[name] : "");
  const listValue = (name) => (record && Array.isArray(record[name]) ? record[name].join(", ") : "");
  const controls = {
    key_alias: input({name: "key_alias", value: value("key_alias")}),
    duration: input({name: "duration", value: ""}),
    models: input({name: "models", value: listValue("models")}),
    allowed_routes: input({name: "allowed_routes", value: listValue("allowed_routes")}),
    max_budget: input({name: "max_budget", type: "number", min: "0", step: "any", value: String(value("max_budget"))}),
    budget_duration: input({name: "budget_duration", value: value("budget_duration")}),
    rpm_limit: input({name: "rpm_limit", type: "number", min: "0", step: "1", value: String(value("rpm_limit"))}),
    tpm_limit: input({name: "tpm_limit", type: "number", min: "0", step: "1", value: String(value("tpm_limit"))}),
    max_parallel_requests: input({name: "max_parallel_requests", type: "number", min: "0", step: "1",
      value: String(value("max_parallel_requests"))}),
    user_id: input({name: "user_id", value: value("user_id")}),
    team_id: input({name: "team_id", value: value("team_id")}),
    tags: input({name: "tags", value: listValue("tags")}),
    metadata: h("textarea", {name: "metadata", rows: "3", spellcheck: "false",
      value: record && record.metadata && Object.keys(record.metadata).length ? JSON.stringify(record.metadata, null, 2) : ""}),
    blocked: h("input", {type: "checkbox", name: "blocked", id: nextId("f"), checked: Boolean(record && record.blocked)}),
  };
  if (creating) controls.key = input({name: "key", value: ""});
  const fieldsets = [
    h("fieldset", null, h("legend", null, "Key"),
      field("Alias", controls.key_alias, "Unique name, e.g. alice-laptop."),
      field(creating ? "Expires after" : "New lifetime from now", controls.duration,
        creating ? "e.g. 30d, 12h, 2w, 1mo; empty: never expires." : "e.g. 30d; -1: never expires; empty: unchanged."),
      creating ? field("Custom key (optional)", controls.key, "sk-… of at least 16 characters; empty: a random key.") : null,
      h("div", {class: "field check"}, controls.blocked,
        h("label", {for: controls.blocked.id}, creating ? "Create it blocked" : "Blocked"))),
    h("fieldset", null, h("legend", null, "Access"),
      field("Models", controls.models, "Comma-separated; empty: every model."),
      field("Allowed routes", controls.allowed_routes, "Comma-separated, e.g. /v1/chat/completions, /v1/*; empty: all key routes.")),
    h("fieldset", null, h("legend", null, "Budget"),
      field("Max budget", controls.max_budget, "Empty: no budget."),
      field("Budget period", controls.budget_duration, "e.g. 30d: the spend restarts every period; empty: never.")),
    h("fieldset", null, h("legend", null, "Rate limits"),
      field("Requests per minute (rpm)", controls.rpm_limit),
      field("Tokens per minute (tpm)", controls.tpm_limit),
      field("Parallel requests", controls.max_parallel_requests)),
    h("fieldset", null, h("legend", null, "Owner"),
      field("User id", controls.user_id), field("Team id", controls.team_id),
      field("Tags", controls.tags, "Comma-separated."),
      field("Metadata (JSON object)", controls.metadata)),
  ];
  return {controls, body: h("div", {class: "form-grid"}, fieldsets)};
}

class FormError extends Error {
  constructor(param, message) {
    super(message);
    this.param = param;
  }
}

function readForm(controls, original) {
  const out = {};
  const changed = (name, value) => {
    if (!original) return value !== null && !(Array.isArray(value) && !value.length) && value !== "";
    const before = original[name] === undefined ? null : original[name];
    return JSON.stringify(before) !== JSON.stringify(value);
  };
  for (const name of TEXT_FIELDS) {
    const text = controls[name].value.trim();
    const value = text === "" ? null : text;
    if (changed(name, value)) out[name] = value;
  }
  for (const name of LIST_FIELDS) {
    const value = controls[name].value.split(",").map((s) => s.trim()).filter(Boolean);
    if (changed(name, value)) out[name] = value;
  }
  const budgetText = controls.max_budget.value.trim();
  const budget = budgetText === "" ? null : Number(budgetText);
  if (budget !== null && !(Number.isFinite(budget) && budget >= 0)) throw new FormError("max_budget", "Max budget: a number of 0 or more.");
  if (changed("max_budget", budget)) out.max_budget = budget;
  for (const name of INT_FIELDS) {
    const text = controls[name].value.trim();
    const number = text === "" ? null : Number(text);
    if (number !== null && !(Number.isInteger(number) && number >= 0)) throw new FormError(name, `${name}: a whole number of 0 or more.`);
    if (changed(name, number)) out[name] = number;
  }
  const metaText = controls.metadata.value.trim();
  let metadata = {};
  if (metaText) {
    try {
      metadata = JSON.parse(metaText);
    } catch {
      throw new FormError("metadata", "Metadata: not valid JSON.");
    }
    if (!metadata || typeof metadata !== "object" || Array.isArray(metadata)) throw new FormError("metadata", "Metadata: must be a JSON object.");
  }
  if (original ? JSON.stringify(original.metadata || {}) !== JSON.stringify(metadata) : metaText) out.metadata = metadata;
  const blocked = controls.blocked.checked;
  if (original ? Boolean(original.blocked) !== blocked : blocked) out.blocked = blocked;
  const duration = controls.duration.value.trim();
  if (duration) out.duration = duration;
  if (controls.key && controls.key.value.trim()) out.key = controls.key.value.trim();
  return out;
}

/** A form dialog whose submit calls `send(payload)`; API errors naming a field mark that field. */
function formDialog({title, body, controls, submitLabel, build, send}) {
  const error = h("p", {class: "error", role: "alert"});
  const formId = nextId("form");
  const submit = h("button", {type: "submit", class: "primary", form: formId}, submitLabel);
  const cancel = h("button", {type: "button", onclick: () => close()}, "Cancel");
  const form = h("form", {id: formId, novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    for (const control of Object.values(controls)) control.removeAttribute("aria-invalid");
    error.textContent = "";
    let payload;
    try {
      payload = build();
    } catch (problem) {
      return flag(problem.param, problem.message);
    }
    submit.disabled = true;
    try {
      await send(payload, close);
    } catch (problem) {
      flag(problem.param, describe(problem));
    } finally {
      submit.disabled = false;
    }
  }}, body, error);
  function flag(param, message) {
    error.textContent = message;
    const control = param && controls[param.replace(/\[\d+\]$/, "")];
    if (control) {
      control.setAttribute("aria-invalid", "true");
      control.focus();
    }
  }
  const {close} = openDialog({title, body: form, actions: [submit, cancel], wide: true});
  return close;
}

function createKey(reload) {
  const {controls, body} = keyForm(null, true);
  formDialog({title: "Create a key", body, controls, submitLabel: "Create key",
    build: () => readForm(controls, null),
    send: async (payload, close) => {
      const created = await post("/key/generate", payload);
      close();
      announce(`Key ${nameOf(created)} created.`, "ok");
      showKeyOnce("Key created", created, reload);
    }});
}

function editKey(record, reload) {
  const {controls, body} = keyForm(record, false);
  formDialog({title: `Edit ${nameOf(record)}`, body, controls, submitLabel: "Save changes",
    build: () => readForm(controls, record),
    send: async (payload, close) => {
      if (!Object.keys(payload).length) {
        close();
        announce("Nothing changed.");
        return;
      }
      const updated = await post("/key/update", {key: record.token, ...payload});
      close();
      announce(`Key ${nameOf(updated)} saved.`, "ok");
      reload();
    }});
}

function regenerateKey(record, reload) {
  const grace = input({name: "grace_period", value: ""});
  const controls = {grace_period: grace};
  const body = h("div", null,
    h("p", null, `A new key replaces ${nameOf(record)}, with the same settings, spend and limits. `
      + "The old key stops at once, or after the grace period."),
    field("Grace period for the old key", grace, "e.g. 10m, 1h, 1d; empty: the old key stops now."));
  formDialog({title: `Regenerate ${nameOf(record)}`, body, controls, submitLabel: "Regenerate",
    build: () => (grace.value.trim() ? {grace_period: grace.value.trim()} : {}),
    send: async (payload, close) => {
      const created = await post("/key/regenerate", {key: record.token, ...payload});
      close();
      announce(`Key ${nameOf(created)} regenerated.`, "ok");
      showKeyOnce("Key regenerated", created, reload);
    }});
}

async function setBlocked(record, blocked, reload) {
  try {
    await post(blocked ? "/key/block" : "/key/unblock", {key: record.token});
    announce(`Key ${nameOf(record)} ${blocked ? "blocked" : "unblocked"}.`, "ok");
  } catch (error) {
    announce(describe(error), "error");
  }
  reload();
}

async function deleteKey(record, reload) {
  const sure = await confirmDialog(`Delete ${nameOf(record)}?`,
    `The key ${record.key_name || ""} and every copy it was regenerated from stop working at once. This cannot be undone.`,
    "Delete key");
  if (!sure) return;
  try {
    await post("/key/delete", {keys: [record.token]});
    announce(`Key ${nameOf(record)} deleted.`, "ok");
  } catch (error) {
    announce(describe(error), "error");
  }
  reload();
}

/** The plaintext key, shown this once, with a copy button (select-the-text fallback). */
function showKeyOnce(title, created, onDone) {
  const value = h("input", {type: "text", id: "new-key-value", class: "mono secret", readOnly: true, value: created.key,
    autocomplete: "off", spellcheck: "false"});
  const note = h("p", {class: "muted", role: "status"});
  const copy = h("button", {type: "button", id: "copy-key", onclick: async () => {
    try {
      await navigator.clipboard.writeText(value.value);
      note.textContent = "Copied to the clipboard.";
    } catch {
      value.focus();
      value.select();
      let copied = false;
      try {
        copied = document.execCommand("copy");
      } catch {
        copied = false;
      }
      note.textContent = copied ? "Copied to the clipboard." : "The key is selected: press Ctrl+C (or ⌘C) to copy it.";
    }
  }}, "Copy key");
  const done = h("button", {type: "button", class: "primary", onclick: () => close()}, "Done");
  const body = h("div", {class: "key-once"},
    h("p", null, h("strong", null, "This is the only time the key is shown."),
      " Copy it now and hand it to its holder; the gateway keeps only its hash."),
    field(`New key of ${nameOf(created)}`, value), h("div", {class: "actions inline"}, copy), note,
    facts([["Key name", created.key_name], ["Expires", fmtTime(created.expires, "never")]]));
  const {close} = openDialog({title, body, actions: [done], initialFocus: copy, onClose: onDone});
}

/** The whole record of one key (no plaintext: the API never returns it after creation). */
export function keyDetails(record) {
  const limits = (r) => limitsText(r);
  const previous = Array.isArray(record.previous_tokens) && record.previous_tokens.length
    ? h("ul", null, record.previous_tokens.map((p) => h("li", null, h("code", null, p.token), ` until ${fmtTime(p.expires, "?")}`)))
    : "none";
  const body = facts([
    ["Alias", record.key_alias || "(no alias)"],
    ["Key name", h("code", null, record.key_name || "")],
    ["Token (sha256)", h("code", {class: "wrap"}, record.token || "")],
    ["Status", statusOf(record)],
    ["Models", fmtList(record.models, "all")],
    ["Allowed routes", fmtList(record.allowed_routes, "all key routes")],
    ["Limits", limits(record)],
    ["Spend this period", fmtMoney(record.spend)],
    ["Max budget", record.max_budget === null || record.max_budget === undefined ? "none" : fmtMoney(record.max_budget)],
    ["Budget period", record.budget_duration || "none"],
    ["Budget resets", fmtTime(record.budget_reset_at, "never")],
    ["Total spend", fmtMoney(record.total_spend)],
    ["Requests", fmtInt(record.requests)],
    ["Tokens (prompt / completion)", `${fmtInt(record.prompt_tokens)} / ${fmtInt(record.completion_tokens)}`],
    ["Created", fmtTime(record.created_at)],
    ["Expires", fmtTime(record.expires, "never")],
    ["Last used", fmtTime(record.last_used_at, "never")],
    ["User id", record.user_id || "—"],
    ["Team id", record.team_id || "—"],
    ["Tags", fmtList(record.tags, "none")],
    ["Metadata", h("pre", {class: "json"}, fmtJson(record.metadata || {}))],
    ["Regenerated from (in grace)", previous],
  ]);
  const ok = h("button", {type: "button", onclick: () => close()}, "Close");
  const {close} = openDialog({title: `Key ${nameOf(record)}`, body, actions: [ok], initialFocus: ok, wide: true});
}
