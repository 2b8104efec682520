// Operator: each vLLM replica as the gateway sees it (state, in flight, last error) and as it
// reports itself on its /metrics (requests running and waiting, KV-cache use).

import {describe, get} from "./api.js";
import {dataTable, fmtInt, fmtPercent, fmtTime, h} from "./dom.js";

export const title = "Replicas";

const NOT_REPORTED = "not reported";

function figure(vllm, name, format) {
  if (!vllm || vllm[name] === null || vllm[name] === undefined) return NOT_REPORTED;
  return format(vllm[name]);
}

export async function render(root, ctx) {
  const out = h("div", {id: "replicas-out"});
  const updated = h("span", {class: "muted", id: "replicas-updated"});
  root.append(h("div", {class: "page-tools"},
    h("button", {type: "button", id: "replicas-refresh", onclick: () => load()}, "Refresh"), updated), out);

  async function load() {
    const current = ctx.fresh("load");  // a later call of it wins
    out.setAttribute("aria-busy", "true");
    try {
      const data = await get("/replicas");
      if (!current()) return;
      const replicas = Array.isArray(data.replicas) ? data.replicas : [];
      out.replaceChildren(dataTable("vLLM replicas", [
        {label: "Replica", rowHeader: true, cell: (r) => h("code", null, r.name || "")},
        {label: "State", cell: (r) => h("span", {class: `badge ${r.status === "up" ? "active" : "blocked"}`}, r.status)},
        {label: "Detail", cell: (r) => r.detail},
        {label: "In flight (this worker)", numeric: true, cell: (r) => fmtInt(r.inflight)},
        {label: "Cooling off (s)", numeric: true, cell: (r) => (r.cooling_off_s ? String(r.cooling_off_s) : "0")},
        {label: "Last error", cell: (r) => r.last_error || "none"},
        {label: "Running", numeric: true, cell: (r) => figure(r.vllm, "requests_running", fmtInt)},
        {label: "Waiting", numeric: true, cell: (r) => figure(r.vllm, "requests_waiting", fmtInt)},
        {label: "KV-cache use", numeric: true, cell: (r) => figure(r.vllm, "kv_cache_usage", fmtPercent)},
        {label: "Preemptions", numeric: true, cell: (r) => figure(r.vllm, "preemptions_total", fmtInt)},
        {label: "vLLM metrics", cell: (r) => (r.vllm && r.vllm.error ? `unreadable: ${r.vllm.error}` : "read")},
      ], replicas, {empty: "No replica configured.", className: "replicas-table"}));
      updated.textContent = `Updated ${fmtTime(new Date().toISOString())}`;
    } catch (error) {
      if (!current()) return;
      out.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
    } finally {
      out.removeAttribute("aria-busy");
    }
  }

  await load();
}
