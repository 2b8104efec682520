// Building the page from data. Every value reaches the DOM as text (textContent, text nodes,
// attribute values): never through innerHTML, so nothing a key's alias, metadata, an end-user id
// or an error message holds is ever parsed as markup.

const PROPERTIES = new Set(["value", "checked", "disabled", "selected", "open", "readOnly", "required"]);

/** h("button", {type: "button", onclick: fn, "aria-label": "…"}, "text", childNode, …) */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) {
      if (typeof value !== "function") throw new TypeError(`${name} must be a function`);
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (PROPERTIES.has(name)) {
      el[name] = value;
    } else if (name === "href" && /^#[a-z-]*$/.test(value)) {
      el.setAttribute("href", value);  // in-page routes only
    } else if (name === "style" || name === "href" || name === "src") {
      throw new TypeError(`h(): ${name} is not set from data`);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

let uid = 0;
export function nextId(prefix) {
  uid += 1;
  return `${prefix}-${uid}`;
}

// -- formatting -----------------------------------------------------------------------------

const DASH = "—";

export function fmtInt(n) {
  return n === null || n === undefined ? DASH : Number(n).toLocaleString("en-US", {maximumFractionDigits: 0});
}

/** Dollars as the API sends them (exact to the nano-dollar): 2 to 9 decimals, nothing rounded away. */
export function fmtMoney(n) {
  if (n === null || n === undefined) return DASH;
  return Number(n).toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 9});
}

/**
 * The sum of two dollar amounts from the API, added in whole nano-dollars: each is the double
 * nearest an exact nano-dollar amount, so the sum prints exactly (0.1 + 0.2 is 0.3, not
 * 0.30000000000000004, in the tables and the CSV). Exact up to 2^51 nano-dollars (2.2 million USD).
 */
export function addMoney(a, b) {
  return (Math.round((Number(a) || 0) * 1e9) + Math.round((Number(b) || 0) * 1e9)) / 1e9;
}

export function fmtPercent(share) {
  return share === null || share === undefined ? DASH : `${(Number(share) * 100).toFixed(1)}%`;
}

/** "2026-11-27T12:00:00Z" -> "2026-11-27 12:00:00 UTC"; null -> `empty`. */
export function fmtTime(iso, empty = DASH) {
  if (!iso) return empty;
  return String(iso).replace("T", " ").replace(/\.\d+/, "").replace(/Z$|\+00:00$/, " UTC");
}

/** A bucket start as the chart and table label it: hours with their time, days without. */
export function fmtBucket(iso, interval) {
  const text = String(iso).replace("T", " ").replace(/:\d\d(\.\d+)?(Z|\+00:00)$/, "");
  return interval === "day" ? text.slice(0, 10) : text;
}

export function fmtList(list, empty) {
  return Array.isArray(list) && list.length ? list.join(", ") : empty;
}

export function fmtJson(value) {
  if (value === null || value === undefined) return DASH;
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

// -- building blocks -------------------------------------------------------------------------

/**
 * A data table: columns [{label, cell(row) -> text|Node, numeric, rowHeader}], rows.
 * Column heads are <th scope="col">; a column marked rowHeader is <th scope="row">.
 */
export function dataTable(caption, columns, rows, {empty = "Nothing to show.", className = ""} = {}) {
  const head = h("thead", null, h("tr", null,
    columns.map((c) => h("th", {scope: "col", class: c.numeric ? "num" : null}, c.label))));
  const body = h("tbody");
  if (!rows.length) {
    body.append(h("tr", null, h("td", {colspan: columns.length, class: "empty"}, empty)));
  }
  for (const row of rows) {
    body.append(h("tr", null, columns.map((c) => {
      const value = c.cell(row);
      return h(c.rowHeader ? "th" : "td", {scope: c.rowHeader ? "row" : null, class: c.numeric ? "num" : null},
        value instanceof Node ? value : value === null || value === undefined ? DASH : String(value));
    })));
  }
  const table = h("table", {class: `data ${className}`.trim()}, h("caption", null, caption), head, body);
  return h("div", {class: "table-wrap"}, table);
}

/** <label> + control, wired by id. */
export function field(label, control, hint) {
  if (!control.id) control.id = nextId("f");
  const parts = [h("label", {for: control.id}, label), control];
  if (hint) {
    const hintEl = h("span", {class: "hint", id: nextId("hint")}, hint);
    control.setAttribute("aria-describedby", hintEl.id);
    parts.push(hintEl);
  }
  return h("div", {class: "field"}, parts);
}

export function input(props) {
  return h("input", {type: "text", autocomplete: "off", spellcheck: "false", ...props});
}

export function select(options, props) {
  const el = h("select", props);
  for (const [value, label] of options) el.append(h("option", {value}, label));
  if (props && props.value !== undefined) el.value = props.value;
  return el;
}

/** A definition list of [term, value] pairs (values as text or nodes). */
export function facts(pairs, className = "facts") {
  return h("dl", {class: className}, pairs.map(([term, value]) => [
    h("dt", null, term),
    h("dd", null, value instanceof Node ? value : value === null || value === undefined ? DASH : String(value)),
  ]));
}

/** Spend against a budget: a <meter> and the figures as text. */
export function budgetBar(spend, budget, label) {
  const text = budget === null || budget === undefined
    ? `${fmtMoney(spend)} (no budget)`
    : `${fmtMoney(spend)} of ${fmtMoney(budget)}`;
  const wrap = h("span", {class: "budget"});
  if (budget !== null && budget !== undefined) {
    const meter = h("meter", {min: 0, max: budget || 1, value: Math.min(spend || 0, budget || 1),
      low: (budget || 1) * 0.75, high: (budget || 1) * 0.9, optimum: 0, "aria-label": label});
    wrap.append(meter);
  }
  wrap.append(h("span", null, text));
  return wrap;
}

// -- announcements and dialogs ---------------------------------------------------------------

export function announce(message, kind = "info") {
  const status = document.getElementById("status");
  status.className = `status ${kind}`;
  status.textContent = "";
  // A change of text is what screen readers announce: clear first, then set on the next frame.
  requestAnimationFrame(() => { status.textContent = message; });
}

/**
 * A modal <dialog>: focus goes to `initialFocus` (or its first control) when it opens and back
 * to what had it when it closes; Escape closes it (the browser's own `cancel`). Returns
 * {dialog, close}; the dialog removes itself once closed.
 */
export function openDialog({title, body, actions = [], initialFocus, onClose, wide = false}) {
  const titleId = nextId("dlg-title");
  const opener = document.activeElement;
  const dialog = h("dialog", {class: wide ? "wide" : null, "aria-labelledby": titleId},
    h("h2", {id: titleId}, title), body, actions.length ? h("div", {class: "actions"}, actions) : null);
  const close = () => { if (dialog.open) dialog.close(); };
  dialog.addEventListener("close", () => {
    dialog.remove();
    if (onClose) onClose();
    if (opener && opener.isConnected && typeof opener.focus === "function") opener.focus();
  });
  document.body.append(dialog);
  dialog.showModal();
  const target = typeof initialFocus === "function" ? initialFocus() : initialFocus;
  (target || dialog.querySelector("input, select, textarea, button"))?.focus();
  return {dialog, close};
}

/** A confirmation dialog; resolves true when confirmed. Cancel has the focus at first. */
export function confirmDialog(title, message, confirmLabel) {
  return new Promise((resolve) => {
    let confirmed = false;
    const cancel = h("button", {type: "button", onclick: () => close()}, "Cancel");
    const ok = h("button", {type: "button", class: "danger", onclick: () => { confirmed = true; close(); }},
      confirmLabel);
    const {close} = openDialog({title, body: h("p", null, message), actions: [ok, cancel],
      initialFocus: cancel, onClose: () => resolve(confirmed)});
  });
}

/** CSV text: RFC 4180 quoting, and text cells that a spreadsheet would run as a formula defused. */
export function toCsv(rows) {
  return rows.map((row) => row.map((cell) => {
    if (typeof cell === "number") return String(cell);
    let text = cell === null || cell === undefined ? "" : String(cell);
    if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`;
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }).join(",")).join("\r\n") + "\r\n";
}

export function download(filename, text, type = "text/csv") {
  const url = URL.createObjectURL(new Blob([text], {type: `${type};charset=utf-8`}));
  const link = h("a", {download: filename, class: "hidden"});
  link.href = url;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
