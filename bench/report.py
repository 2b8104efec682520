"""Medians over rounds, ratios, and the markdown report of a bench.run result."""
from __future__ import annotations

import json
import statistics
import sys

TARGET_NAMES = {"direct": "direct to fake vLLM", "gateway_master": "gateway, master key",
                "gateway_virtual": "gateway, virtual key", "null": "null app",
                "minimal_proxy": "minimal proxy (Flask + requests)"}
CPU_COLUMNS = ("fake_vllm", "gateway_master", "gateway_worker", "null_master", "null_worker",
               "minimal_proxy_master", "minimal_proxy_worker", "redis_server", "loadgen")


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _per_target(rounds: list[dict]) -> dict[str, list[dict]]:
    by_target: dict[str, list[dict]] = {}
    for rnd in rounds:
        for target, result in rnd.items():
            by_target.setdefault(target, []).append(result)
    return by_target


def _ratio(rnd: dict, num: str, den: str, key: str = "rps"):
    if num in rnd and den in rnd and rnd[den][key]:
        return rnd[num][key] / rnd[den][key]
    return None


def _cpu(results: list[dict]) -> dict:
    names = sorted({name for r in results for name in r["cpu_s"]})
    return {
        "wall_s": median(r["wall_s"] for r in results),
        "cpu_s": {n: median(r["cpu_s"].get(n) for r in results) for n in names},
        "others_cpu_s": median(r["others_cpu_s"] for r in results),
        "irq_cpu_s": median(r["irq_cpu_s"] for r in results),
        "machine_busy_cores": median(r["machine_busy_cores"] for r in results),
    }


def _rps_summary(results: list[dict]) -> dict:
    return {
        "rps": median(r["rps"] for r in results),
        "p50_ms": median(r["p50_ms"] for r in results),
        "p90_ms": median(r["p90_ms"] for r in results),
        "p99_ms": median(r["p99_ms"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "loadgen_cpu_frac": median(r["loadgen_cpu_frac"] for r in results),
        "rps_rounds": [r["rps"] for r in results],
    }


def _stream_summary(results: list[dict]) -> dict:
    keys = ("ttfb_p50_ms", "ttfb_p99_ms", "ttfb_max_ms", "first_event_p99_ms", "total_s",
            "events_per_stream_median", "reads_per_stream_median", "reads_per_stream_min",
            "streams_with_merged_reads", "loadgen_cpu_frac")
    out = {k: median(r[k] for r in results) for k in keys}
    out.update(streams=results[0]["streams"], completed_min=min(r["completed"] for r in results),
               all_completed=all(r["all_completed"] for r in results),
               errors=sum(r["errors"] for r in results),
               error_samples=sorted({e for r in results for e in r["error_samples"]})[:5])
    return out


def summarise(scenario: str, rounds: list[dict]) -> dict:
    """Medians across rounds per target; ratios are medians of the per-round ratios."""
    by_target = _per_target(rounds)
    summary = {"targets": {}, "cpu": {t: _cpu(rs) for t, rs in by_target.items()}}
    if scenario in ("nonstream_c32", "latency_c1"):
        summary["targets"] = {t: _rps_summary(rs) for t, rs in by_target.items()}
    else:
        summary["targets"] = {t: _stream_summary(rs) for t, rs in by_target.items()}
    if scenario == "nonstream_c32":
        summary["ratios"] = {
            "gateway_over_direct_rps": median(_ratio(r, "gateway_master", "direct") for r in rounds),
            "gateway_over_null_rps": median(_ratio(r, "gateway_master", "null") for r in rounds),
            "virtual_over_master_rps": median(_ratio(r, "gateway_virtual", "gateway_master") for r in rounds),
            "gateway_over_minimal_proxy_rps": median(_ratio(r, "gateway_master", "minimal_proxy") for r in rounds),
            "virtual_over_minimal_proxy_rps": median(_ratio(r, "gateway_virtual", "minimal_proxy") for r in rounds),
        }
    elif scenario == "latency_c1":
        summary["added_p50_ms"] = median(r["gateway_master"]["p50_ms"] - r["direct"]["p50_ms"] for r in rounds)
        summary["minimal_proxy_added_p50_ms"] = median(
            r["minimal_proxy"]["p50_ms"] - r["direct"]["p50_ms"] for r in rounds if "minimal_proxy" in r)
    elif scenario == "streams_1000":
        rss = [r["gateway_master"]["rss_max_kb"]["gateway"] / 1024 for r in rounds]
        summary["gateway_rss_max_mb"] = round(max(rss), 1)
        summary["gateway_rss_max_mb_median"] = round(statistics.median(rss), 1)
    return summary


def _f(value, digits=1):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _nonstream(s: dict, cfg: dict) -> list[str]:
    rows = [[TARGET_NAMES[t], _f(v["rps"], 0), _f(v["p50_ms"], 2), _f(v["p90_ms"], 2), _f(v["p99_ms"], 2),
             v["errors"], _f(v["loadgen_cpu_frac"], 2), " / ".join(_f(x, 0) for x in v["rps_rounds"])]
            for t, v in s["targets"].items()]
    r = s["ratios"]
    floor = [["gateway (master) / minimal proxy req/s", _f(r.get("gateway_over_minimal_proxy_rps"), 3)],
             ["gateway (virtual) / minimal proxy req/s", _f(r.get("virtual_over_minimal_proxy_rps"), 3)]]
    return ([f"## nonstream_c32: 32 connections, non-stream chat completions, {cfg['duration_s']:g} s each", ""]
            + _table(["target", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "loadgen CPU (cores)",
                      "req/s per round"], rows)
            + _table(["ratio (median of per-round ratios)", "value"], [
                ["gateway (master) / direct req/s", _f(r["gateway_over_direct_rps"], 3)],
                ["gateway (master) / null app req/s", _f(r["gateway_over_null_rps"], 3)],
                ["gateway virtual key / master key req/s", _f(r["virtual_over_master_rps"], 3)]]
                + (floor if "minimal_proxy" in s["targets"] else [])))


def _latency(s: dict, cfg: dict) -> list[str]:
    rows = [[TARGET_NAMES[t], _f(v["p50_ms"], 3), _f(v["p90_ms"], 3), _f(v["p99_ms"], 3), _f(v["rps"], 0), v["errors"]]
            for t, v in s["targets"].items()]
    rows.append(["**added by the gateway (p50)**", f"**{_f(s['added_p50_ms'], 3)}**", "", "", "", ""])
    if "minimal_proxy" in s["targets"]:
        rows.append(["added by the minimal proxy (p50)", _f(s.get("minimal_proxy_added_p50_ms"), 3), "", "", "", ""])
    return ([f"## latency_c1: one connection, requests back to back, {cfg['duration_s']:g} s each", ""]
            + _table(["target", "p50 ms", "p90 ms", "p99 ms", "req/s", "errors"], rows))


def _streams(name: str, s: dict, cfg: dict) -> list[str]:
    rows = []
    for t, v in s["targets"].items():
        rows.append([TARGET_NAMES[t], f"{v['completed_min']}/{v['streams']}", _f(v["all_completed"]),
                     _f(v["ttfb_p50_ms"]), _f(v["ttfb_p99_ms"]), _f(v["ttfb_max_ms"]),
                     _f(v["first_event_p99_ms"]), _f(v["total_s"], 2),
                     _f(v["events_per_stream_median"], 0),
                     f"{_f(v['reads_per_stream_median'], 0)} (min {_f(v['reads_per_stream_min'], 0)})",
                     _f(v["streams_with_merged_reads"], 0), v["errors"], _f(v["loadgen_cpu_frac"], 2)])
    h = cfg["stream_headers"]
    lines = [f"## {name}: {rows[0][1].split('/')[1]} SSE streams opened at once "
             f"({h['x-fake-chunks']} tokens, {h['x-fake-chunk-delay-ms']} ms apart)", ""]
    lines += _table(["target", "completed (worst round)", "all?", "TTFB p50 ms", "TTFB p99 ms", "TTFB max ms",
                     "1st event p99 ms", "total s", "events/stream", "reads with data/stream",
                     "streams with merged reads", "errors", "loadgen CPU (cores)"], rows)
    if "gateway_rss_max_mb" in s:
        lines += [f"Gateway RSS (gunicorn master + worker), max sampled during the run: "
                  f"**{s['gateway_rss_max_mb']} MB** (median of per-round maxima "
                  f"{s['gateway_rss_max_mb_median']} MB).", ""]
    errors = [e for v in s["targets"].values() for e in v["error_samples"]]
    if errors:
        lines += ["Errors seen: " + "; ".join(errors[:5]), ""]
    return lines


def _cpu_table(results: dict) -> list[str]:
    present = [c for c in CPU_COLUMNS if any(c in cpu["cpu_s"] for s in results["scenarios"].values()
                                              for cpu in s["summary"]["cpu"].values())]
    rows = []
    for name, s in results["scenarios"].items():
        for target, cpu in s["summary"]["cpu"].items():
            rows.append([f"{name} / {TARGET_NAMES[target]}", _f(cpu["wall_s"], 1)]
                        + [_f(cpu["cpu_s"].get(c), 2) for c in present]
                        + [_f(cpu["irq_cpu_s"], 2), _f(cpu["others_cpu_s"], 2),
                           _f(cpu["machine_busy_cores"], 2)])
    return (["## CPU seconds used during each measurement (median over rounds)", "",
             f"All processes share {results['machine']['cpu_count']} cores, so at most "
             f"{results['machine']['cpu_count']} CPU-seconds per wall second exist. `irq`: interrupt "
             "and softirq time (loopback TCP), charged to no process. `others`: CPU used by "
             "processes not listed (other users, tests). `busy cores`: "
             "all CPU used / wall time. Wall time includes the load generator's start-up and warm-up.", ""]
            + _table(["measurement", "wall s"] + present + ["irq", "others", "busy cores"], rows))


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [f"# Gateway benchmark, {m['date']}", "",
             f"{m['cpu_count']} CPU cores shared by every process below; Python {m['python']}; "
             f"{m['platform']}; {cfg['rounds']} interleaved round(s), medians shown"
             + (" (QUICK smoke mode: figures are not meaningful)" if cfg["quick"] else "") + ".",
             f"Gateway: 1 gunicorn gevent worker, Redis {cfg['redis'] or 'off'}"
             + (f", extra env {' '.join(cfg['gateway_env'])}" if cfg["gateway_env"] else "")
             + f". Total run time {results['elapsed_s']} s.", ""]
    for note in results["notes"]:
        lines += [f"Note: {note}", ""]
    sections = {"nonstream_c32": _nonstream, "latency_c1": _latency}
    for name, s in results["scenarios"].items():
        if name in sections:
            lines += sections[name](s["summary"], cfg)
        else:
            lines += _streams(name, s["summary"], cfg)
    lines += _cpu_table(results)
    idle = results["idle_rss_kb"]
    lines += ["Processes: " + "; ".join(f"`{n}`: {c}" for n, c in results["processes"]["commands"].items())
              + ". Idle RSS after start-up: " + ", ".join(f"{n} {kb / 1024:.1f} MB" for n, kb in idle.items()) + ".", ""]
    return "\n".join(lines)


def write_results(out, results: dict, text: str) -> None:
    """Save the machine-readable JSON and the readable table beside it, and print the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
