// Usage charts (the vendored Chart.js, a global from its UMD file), each with the same figures
// as a table and as a CSV download. Chart.js draws on a canvas: labels taken from data (aliases,
// model names, end-user ids) are painted as pixels, never parsed as markup.

import {addMoney, dataTable, download, fmtBucket, fmtInt, fmtMoney, h, toCsv} from "./dom.js";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
  "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d"];
const OTHER_COLOUR = "#9e9e9e";

const live = new Set();

/** Forget every chart of the page being left. */
export function destroyCharts() {
  for (const chart of live) chart.destroy();
  live.clear();
}

const addCount = (a, b) => a + (Number(b) || 0);

// `add` sums a metric's values: money in whole nano-dollars, so totals print exactly.
export const METRICS = {
  spend: {title: "Spend", format: fmtMoney, unit: "spend", add: addMoney},
  total_tokens: {title: "Tokens", format: fmtInt, unit: "tokens", add: addCount},
  requests: {title: "Requests", format: fmtInt, unit: "requests", add: addCount},
};

/**
 * Append a section to `parent`: a stacked bar chart of one metric over the buckets, one dataset
 * per series ({label, values, other}), the table of the same numbers and a CSV download.
 */
export function usageSection(parent, {id, metric, buckets, interval, series, groupLabel, csvName}) {
  const spec = METRICS[metric];
  const per = interval === "hour" ? "hour" : "day";
  const titleId = `${id}-title`;
  const description = `${spec.title} per ${per}${groupLabel ? `, stacked by ${groupLabel}` : ""}`;
  const canvas = h("canvas", {id: `${id}-chart`, role: "img", "aria-label": `${description} (chart; the table below has the same figures)`,
    dataset: {metric}});
  canvas.textContent = `${description}: see the table below.`;
  const labels = buckets.map((b) => fmtBucket(b, interval));
  const totals = buckets.map((_, i) => series.reduce((sum, s) => spec.add(sum, s.values[i]), 0));

  const csvButton = h("button", {type: "button", "aria-label": `Download ${description} as CSV`, onclick: () => {
    const header = ["bucket_start_utc", ...series.map((s) => s.label), "total"];
    const rows = buckets.map((b, i) => [b, ...series.map((s) => Number(s.values[i]) || 0), totals[i]]);
    download(csvName, toCsv([header, ...rows]));
  }}, "Download CSV");

  const columns = [
    {label: `${per === "hour" ? "Hour" : "Day"} (UTC)`, rowHeader: true, cell: (r) => r.label},
    ...series.map((s, j) => ({label: s.label, numeric: true, cell: (r) => spec.format(r.values[j])})),
    {label: "Total", numeric: true, cell: (r) => spec.format(r.total)},
  ];
  const rows = buckets.map((_, i) => ({label: labels[i], values: series.map((s) => Number(s.values[i]) || 0),
    total: totals[i]}));
  const grand = series.map((s) => s.values.reduce(spec.add, 0));
  rows.push({label: "All", values: grand, total: grand.reduce(spec.add, 0)});
  const table = dataTable(`${description} (table)`, columns, rows, {className: "usage-table"});

  const section = h("section", {class: "chart-card", id, "aria-labelledby": titleId},
    h("div", {class: "card-head"}, h("h2", {id: titleId}, description), csvButton),
    series.length ? h("div", {class: "chart-box"}, canvas) : h("p", {class: "empty"}, "No usage in this range."),
    h("details", {class: "as-table"}, h("summary", null, `${spec.title} as a table`), table));
  parent.append(section);

  if (series.length && window.Chart) {
    const chart = new window.Chart(canvas, {
      type: "bar",
      data: {
        labels,
        datasets: series.map((s, i) => ({
          label: s.label, data: s.values.map((v) => Number(v) || 0), stack: "usage", borderWidth: 0,
          backgroundColor: s.other ? OTHER_COLOUR : PALETTE[i % PALETTE.length],
        })),
      },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        interaction: {mode: "index", intersect: false},
        scales: {
          x: {stacked: true, ticks: {maxRotation: 0, autoSkip: true}},
          y: {stacked: true, beginAtZero: true, title: {display: true, text: spec.unit},
            ticks: metric === "spend" ? {} : {precision: 0}},
        },
        plugins: {
          legend: {position: "bottom"},
          tooltip: {callbacks: {label: (ctx) => `${ctx.dataset.label}: ${spec.format(ctx.parsed.y)}`}},
        },
      },
    });
    live.add(chart);
  } else if (series.length) {
    section.querySelector(".chart-box").replaceChildren(h("p", {class: "error"}, "The charting library did not load; the table has the figures."));
  }
  return section;
}

/** The label of one /spend/report series. */
export function seriesLabel(entry, groupBy) {
  if (entry.other) return "other";
  if (groupBy === "key") {
    if (entry.group === "master") return "master key";
    if (entry.key_alias) return entry.key_alias;
    return entry.group ? `key ${String(entry.group).slice(0, 12)}…` : "unknown key";
  }
  if (groupBy === "end_user") return entry.group === null || entry.group === "" ? "(none)" : String(entry.group);
  return entry.group === null ? "(none)" : String(entry.group);
}
