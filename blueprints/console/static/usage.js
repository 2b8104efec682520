// Operator: spend, tokens and requests over time from /spend/report (the usage counters, never
// the log), stacked by key, model or end user; top keys and top end users.

import {describe, get} from "./api.js";
import {METRICS, destroyCharts, seriesLabel, usageSection} from "./charts.js";
import {addMoney, dataTable, field, fmtInt, fmtMoney, fmtTime, h, input, select} from "./dom.js";

export const title = "Usage";

const state = {groupBy: "key", interval: "hour", start: "", end: ""};
const GROUP_LABELS = {key: "key", model: "model", end_user: "end user"};
const CHART_GROUPS = 10;  // series drawn; the rest are summed as "other" by the API
const TOP = 10;

/** The date inputs (UTC days) as /spend/report arguments. */
export function rangeArgs(start, end) {
  return {start_date: start ? `${start}T00:00:00Z` : undefined, end_date: end ? `${end}T23:59:59Z` : undefined};
}

/** The controls of a usage view: interval, date range and (optionally) grouping. */
export function rangeControls(prefix, current, {grouping = false} = {}) {
  const controls = {
    interval: select([["hour", "Hourly"], ["day", "Daily"]], {id: `${prefix}-interval`, value: current.interval}),
    start: input({type: "date", id: `${prefix}-start`, value: current.start}),
    end: input({type: "date", id: `${prefix}-end`, value: current.end}),
  };
  if (grouping) {
    controls.groupBy = select([["key", "Key"], ["model", "Model"], ["end_user", "End user"]],
      {id: `${prefix}-group`, value: current.groupBy});
  }
  const fields = [
    grouping ? field("Stack by", controls.groupBy) : null,
    field("Interval", controls.interval),
    field("From (UTC day)", controls.start, "Empty: the last 24 hours or 30 days."),
    field("To (UTC day)", controls.end),
  ];
  return {controls, fields};
}

export async function render(root, ctx) {
  const {controls, fields} = rangeControls("usage", state, {grouping: true});
  const out = h("div", {id: "usage-out"});
  const form = h("form", {class: "toolbar", "aria-label": "Usage range", onsubmit: (event) => {
    event.preventDefault();
    state.groupBy = controls.groupBy.value;
    state.interval = controls.interval.value;
    state.start = controls.start.value;
    state.end = controls.end.value;
    load();
  }}, fields, h("button", {type: "submit", id: "usage-show"}, "Show"));
  root.append(form, out);

  async function load() {
    const current = ctx.fresh("load");  // a later call of it wins
    out.setAttribute("aria-busy", "true");
    const range = {interval: state.interval, ...rangeArgs(state.start, state.end)};
    try {
      const wanted = [state.groupBy, "key", "end_user"].filter((g, i, all) => all.indexOf(g) === i);
      const reports = await Promise.all(wanted.map((groupBy) => get("/spend/report",
        {group_by: groupBy, ...range, limit: groupBy === state.groupBy ? CHART_GROUPS : TOP})));
      if (!current()) return;
      const byGroup = Object.fromEntries(wanted.map((g, i) => [g, reports[i]]));
      byGroup.key = {...byGroup.key, series: mergeByAlias(byGroup.key.series)};
      show(byGroup[state.groupBy], byGroup.key, byGroup.end_user);
    } catch (error) {
      if (!current()) return;
      out.replaceChildren(h("p", {class: "error", role: "alert"}, describe(error)));
    } finally {
      out.removeAttribute("aria-busy");
    }
  }

  function show(report, keys, endUsers) {
    destroyCharts();
    out.replaceChildren(h("p", {class: "muted", id: "usage-window"},
      `${fmtTime(report.start)} to ${fmtTime(report.end)}, ${report.buckets.length} `
      + `${report.interval === "hour" ? "hours" : "days"}; the ${CHART_GROUPS} largest ${GROUP_LABELS[state.groupBy]}s by spend `
      + "are drawn, the rest summed as “other”."));
    const charts = h("div", {class: "charts"});
    out.append(charts);
    for (const metric of Object.keys(METRICS)) {
      usageSection(charts, {
        id: `usage-${metric}`, metric, buckets: report.buckets, interval: report.interval,
        groupLabel: GROUP_LABELS[state.groupBy],
        series: report.series.map((s) => ({label: seriesLabel(s, state.groupBy), values: s[metric] || [], other: s.other})),
        csvName: `usage-${metric}-by-${state.groupBy}-${report.interval}.csv`,
      });
    }
    out.append(h("div", {class: "tops"},
      topTable("Top keys by spend", "Key", keys, "key", "top-keys"),
      topTable("Top end users by spend", "End user", endUsers, "end_user", "top-end-users")));
  }

  await load();
}

/**
 * Key series that are one logical key: a regenerated key's old copy (in its grace period) and
 * the new key carry the same alias, and an alias belongs to one live key, so series with the
 * same alias are added up into one.
 */
export function mergeByAlias(series) {
  const merged = [];
  const byAlias = new Map();
  for (const entry of series) {
    const alias = entry.other ? null : entry.key_alias;
    if (!alias || !byAlias.has(alias)) {
      const copy = {...entry, totals: {...entry.totals}};
      for (const name of ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "spend"]) {
        copy[name] = [...(entry[name] || [])];
      }
      merged.push(copy);
      if (alias) byAlias.set(alias, copy);
      continue;
    }
    const into = byAlias.get(alias);
    for (const name of ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "spend"]) {
      const add = name === "spend" ? addMoney : (a, b) => (Number(a) || 0) + (Number(b) || 0);
      into[name] = into[name].map((v, i) => add(v, (entry[name] || [])[i]));
      into.totals[name] = add(into.totals[name], entry.totals[name]);
    }
  }
  return merged;
}

function topTable(caption, what, report, groupBy, id) {
  const rows = report.series.filter((s) => !s.other).slice(0, TOP);
  const table = dataTable(caption, [
    {label: what, rowHeader: true, cell: (s) => seriesLabel(s, groupBy)},
    {label: "Requests", numeric: true, cell: (s) => fmtInt(s.totals.requests)},
    {label: "Tokens", numeric: true, cell: (s) => fmtInt(s.totals.total_tokens)},
    {label: "Spend", numeric: true, cell: (s) => fmtMoney(s.totals.spend)},
  ], rows, {empty: "No usage in this range."});
  table.id = id;
  return table;
}
