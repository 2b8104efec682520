// Key holder: their own key only (GET /key/info and /key/usage without naming a key: the API
// answers about the calling key and nothing else).

import {describe, get} from "./api.js";
import {METRICS, destroyCharts, usageSection} from "./charts.js";
import {budgetBar, dataTable, facts, fmtInt, fmtList, fmtMoney, fmtTime, h} from "./dom.js";
import {statusOf} from "./keys.js";
import {rangeArgs, rangeControls} from "./usage.js";

export const title = "My key";

const state = {interval: "day", start: "", end: ""};

export async function render(root, ctx) {
  const summary = h("div", {id: "me-summary", class: "cards"});
  const usageOut = h("div", {id: "me-usage"});
  const {controls, fields} = rangeControls("me", state);
  const form = h("form", {class: "toolbar", "aria-label": "Usage range", onsubmit: (event) => {
    event.preventDefault();
    state.interval = controls.interval.value;
    state.start = controls.start.value;
    state.end = controls.end.value;
    loadUsage();
  }}, fields, h("button", {type: "submit"}, "Show"));
  root.append(
    h("div", {class: "page-tools"}, h("button", {type: "button", id: "me-refresh", onclick: () => { loadInfo(); loadUsage(); }}, "Refresh")),
    summary, h("h2", null, "Your usage"), form, usageOut);

  async function loadInfo() {
    const current = ctx.fresh("loadInfo");  // a later call of it wins
    summary.setAttribute("aria-busy", "true");
    try {
      const data = await get("/key/info");
      if (!current()) return;
      showInfo(data.info || {});
    } catch (error) {
      if (!current()) return;
      summary.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
    } finally {
      summary.removeAttribute("aria-busy");
    }
  }

  function showInfo(info) {
    const limits = info.limits || {};
    const minute = (name, label) => {
      const l = limits[name];
      return {label, limit: l ? fmtInt(l.limit) : "no limit", used: l ? fmtInt(l.used ?? l.in_use) : "—",
        remaining: l ? fmtInt(l.remaining) : "—", resets: l && l.resets_at ? fmtTime(l.resets_at).slice(11) : (l ? "as requests end" : "—")};
    };
    summary.replaceChildren(
      h("section", {class: "card", "aria-labelledby": "me-key-title"}, h("h2", {id: "me-key-title"}, "Your key"),
        facts([
          ["Alias", info.key_alias || "(no alias)"],
          ["Key name", h("code", null, info.key_name || "")],
          ["Status", statusOf(info)],
          ["Expires", fmtTime(info.expires, "never")],
          ["Created", fmtTime(info.created_at)],
          ["Last used", fmtTime(info.last_used_at, "never")],
          ["Models", fmtList(info.models, "every model")],
          ["Routes", fmtList(info.allowed_routes, "every route open to keys")],
        ])),
      h("section", {class: "card", "aria-labelledby": "me-budget-title"}, h("h2", {id: "me-budget-title"}, "Budget"),
        facts([
          ["Spend this period", budgetBar(info.spend, info.max_budget, "Your spend against your budget")],
          ["Max budget", info.max_budget === null || info.max_budget === undefined ? "none" : fmtMoney(info.max_budget)],
          ["Budget period", info.budget_duration || "none (never resets)"],
          ["Next reset", fmtTime(info.budget_reset_at, "never")],
          ["Total spend", fmtMoney(info.total_spend)],
          ["Requests", fmtInt(info.requests)],
          ["Tokens (prompt / completion)", `${fmtInt(info.prompt_tokens)} / ${fmtInt(info.completion_tokens)}`],
        ])),
      h("section", {class: "card", "aria-labelledby": "me-limits-title"}, h("h2", {id: "me-limits-title"}, "Limits"),
        dataTable("What your limits leave this minute", [
          {label: "Limit", rowHeader: true, cell: (r) => r.label},
          {label: "Size", numeric: true, cell: (r) => r.limit},
          {label: "Used", numeric: true, cell: (r) => r.used},
          {label: "Remaining", numeric: true, cell: (r) => r.remaining},
          {label: "Resets", cell: (r) => r.resets},
        ], [minute("rpm", "Requests per minute"), minute("tpm", "Tokens per minute"), minute("parallel", "Parallel requests")],
        {className: "limits-table"})),
    );
  }

  async function loadUsage() {
    const current = ctx.fresh("loadUsage");  // a later call of it wins
    usageOut.setAttribute("aria-busy", "true");
    try {
      const report = await get("/key/usage", {interval: state.interval, ...rangeArgs(state.start, state.end)});
      if (!current()) return;
      destroyCharts();
      usageOut.replaceChildren(h("p", {class: "muted"}, `${fmtTime(report.start)} to ${fmtTime(report.end)}: `
        + `${fmtInt(report.totals.requests)} requests, ${fmtInt(report.totals.total_tokens)} tokens, spend ${fmtMoney(report.totals.spend)}.`));
      const charts = h("div", {class: "charts"});
      usageOut.append(charts);
      for (const metric of Object.keys(METRICS)) {
        usageSection(charts, {id: `me-${metric}`, metric, buckets: report.buckets, interval: report.interval,
          series: [{label: "your key", values: report[metric] || [], other: false}],
          csvName: `my-usage-${metric}-${report.interval}.csv`});
      }
    } catch (error) {
      if (!current()) return;
      destroyCharts();
      usageOut.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
    } finally {
      usageOut.removeAttribute("aria-busy");
    }
  }

  await Promise.all([loadInfo(), loadUsage()]);
}
