// Operator: each vLLM replica as the gateway sees it (state, in flight, last error), as it
// reports itself on its /metrics (requests running and waiting, KV-cache use), and the shared
// figures load-aware routing decides on, with their age.

import {describe, get} from "./api.js";
import {dataTable, fmtInt, fmtPercent, fmtTime, h} from "./dom.js";

export const title = "Replicas";

const NOT_REPORTED = "not reported";

function figure(vllm, name, format) {
  if (!vllm || vllm[name] === null || vllm[name] === undefined) return NOT_REPORTED;
  return format(vllm[name]);
}

// What routing sees of a replica: how old its shared figures are, and whether it is saturated.
function routingFigures(replica) {
  const load = replica.load;
  if (!load) return "load-aware routing off";
  if (load.age_s === null || load.age_s === undefined) return "none yet";
  const age = `${Number(load.age_s).toFixed(1)} s old`;
  if (!load.fresh) return `${age} (stale: ignored)`;
  return load.saturated ? `${age}, saturated (${load.saturated})` : `${age}, has room`;
}

function routingSummary(routing) {
  if (!routing) return h("p", {class: "muted", id: "routing-summary"}, "");
  const parts = [routing.load_aware ? "Routing on vLLM's own load" : "Routing to the replica with the fewest requests in flight"];
  if (routing.load_aware) parts.push(routing.affinity ? "conversation affinity on" : "affinity off");
  if (routing.queue) parts.push(`admission queue in this worker: ${fmtInt(routing.queue.length)} of ${fmtInt(routing.queue.max)}`);
  return h("p", {class: "muted", id: "routing-summary"}, `${parts.join("; ")}.`);
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
        {label: "Routing figures", cell: routingFigures},
        {label: "Prefix-cache hits", numeric: true, cell: (r) => figure(r.load, "prefix_cache_hit_rate", fmtPercent)},
      ], replicas, {empty: "No replica configured.", className: "replicas-table"}),
      routingSummary(data.routing));
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
