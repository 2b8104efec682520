// Operator: each vLLM replica as the gateway sees it (state, in flight, last error), as it
// reports itself on its /metrics (requests running and waiting, KV-cache use), and the shared
// figures load-aware routing decides on, with their age; and token reconciliation: the gateway's
// token totals against vLLM's own counters over the last closed window, with the share of
// requests whose usage was estimated.

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

// A drift ratio, signed: the gateway counted more (+) or less (-) than vLLM.
function fmtDrift(ratio) {
  if (ratio === null || ratio === undefined) return "no ratio";
  const percent = Number(ratio) * 100;
  return `${percent > 0 ? "+" : ""}${percent.toFixed(2)}%`;
}

function tokens(window, kind) {
  if (!window) return "no window yet";
  return `${fmtInt(window.gateway[`${kind}_tokens`])} / ${fmtInt(window.vllm[`${kind}_tokens`])} (${fmtDrift(window.drift[kind])})`;
}

// How the last window ended: void (and why), beyond the threshold, or within it. Mirrors the
// server's rule (gateway/relay/reconcile.py Window.drifting): kinds with too few tokens are not judged.
function verdict(window, settings) {
  if (!window) return "none closed yet";
  if (window.void) return `void (${window.void === "vllm_restarted" ? "vLLM restarted" : "readings missing"})`;
  const beyond = ["prompt", "generation"].filter((kind) => {
    const most = Math.max(window.gateway[`${kind}_tokens`], window.vllm[`${kind}_tokens`]);
    if (most < Math.max(settings.min_tokens, 1)) return false;
    const drift = window.drift[kind];
    return drift === null || Math.abs(drift) > settings.drift_threshold;
  });
  return beyond.length ? `drift beyond ${fmtPercent(settings.drift_threshold)} (${beyond.join(", ")})` : "within threshold";
}

function windowSpan(window) {
  if (!window) return "—";
  const age = window.age_s === undefined ? "" : `, closed ${Number(window.age_s).toFixed(0)} s ago`;
  return `${Number(window.seconds).toFixed(0)} s${age}`;
}

function reconciliation(data) {
  const settings = data.reconciliation;
  if (!settings || !settings.on) {
    return h("p", {class: "muted", id: "reconcile-summary"}, "Token reconciliation is off (RECONCILE=0; it is on unless set so).");
  }
  const replicas = Array.isArray(data.replicas) ? data.replicas : [];
  const note = settings.readable === false
    ? "Redis did not answer: the last windows cannot be shown."
    : `Gateway / vLLM tokens per replica over the last closed window of ${fmtInt(settings.window_s)} s; ` +
      `a drift beyond ${fmtPercent(settings.drift_threshold)} is logged once per window. Other clients of the ` +
      "same vLLM, requests straddling a window edge, requests that failed mid-way and estimated usage " +
      "drift legitimately.";
  return h("div", {id: "reconcile-table"},
    dataTable("Token reconciliation (last closed window)", [
      {label: "Replica", rowHeader: true, cell: (r) => h("code", null, r.name || "")},
      {label: "Window", cell: (r) => windowSpan(r.reconciliation)},
      {label: "Prompt tokens: gateway / vLLM (drift)", numeric: true, cell: (r) => tokens(r.reconciliation, "prompt")},
      {label: "Generation tokens: gateway / vLLM (drift)", numeric: true, cell: (r) => tokens(r.reconciliation, "generation")},
      {label: "Requests", numeric: true, cell: (r) => (r.reconciliation ? fmtInt(r.reconciliation.gateway.requests) : "—")},
      {label: "Usage estimated", numeric: true, cell: (r) => (r.reconciliation ? fmtPercent(r.reconciliation.usage_estimated_ratio) : "—")},
      {label: "Verdict", cell: (r) => verdict(r.reconciliation, settings)},
    ], replicas, {empty: "No replica configured.", className: "reconcile-table"}),
    h("p", {class: "muted", id: "reconcile-summary"}, note));
}

export async function render(root, ctx) {
  const out = h("div", {id: "replicas-out"});
  // Beside, not inside, the replicas table: one row per replica there.
  const reconcileOut = h("div", {id: "reconcile-out"});
  const updated = h("span", {class: "muted", id: "replicas-updated"});
  root.append(h("div", {class: "page-tools"},
    h("button", {type: "button", id: "replicas-refresh", onclick: () => load()}, "Refresh"), updated), out,
    reconcileOut);

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
      reconcileOut.replaceChildren(reconciliation(data));
      updated.textContent = `Updated ${fmtTime(new Date().toISOString())}`;
    } catch (error) {
      if (!current()) return;
      out.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
      reconcileOut.replaceChildren();
    } finally {
      out.removeAttribute("aria-busy");
    }
  }

  await load();
}
