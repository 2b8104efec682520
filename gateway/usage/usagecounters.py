"""Usage over time: requests, tokens and spend per hour and per day, by key, model and end user.

A usage report (and the charts built on it) must not read the spend log, so every accounting
batch adds its requests to counters: one hash per bucket (`usage:<interval>:<start>`, UTC
hours and days) with one field per key ("master" for the master key), model and end user. Hours
are kept `hour_buckets_ttl` (8 days), days `day_buckets_ttl` (400 days). Model names and
end-user ids are chosen by callers, so a bucket counts at most `bucket_models` models and
`bucket_end_users` end users separately and adds later new ones to one "other" field; keys are
not capped (only an admin makes keys).

Written with EVAL and its one key (a cluster pipeline routes it by that key; it refuses EVALSHA).

Spend is integer nano-dollars (gateway/usage/money.py), written `n<nanos>`; a value the previous
version wrote holds float dollars there (no `n`), read as money.legacy_nanos reads it and
rewritten as nano-dollars the next time its group is counted. In Lua a group's spend in one
bucket is exact up to 2^53 nano-dollars (9,007,199 USD). `report` and `key_report` return spend
in nano-dollars, so the views can add series exactly; `in_dollars` turns a report into what the
API shows.
"""
from __future__ import annotations

import time

from gateway.core.errors import GatewayError
from gateway.core.timefmt import iso
from gateway.usage.money import as_json, legacy_nanos, to_nanos

MASTER_BUCKET = "master"  # usage of master-key requests (they have no token)
DAY = 86400
INTERVALS = {"hour": 3600, "day": DAY}
# Usage-bucket field prefix of each grouping. Teams are not capped per bucket: only an admin makes them.
GROUPINGS = {"key": "k", "model": "m", "end_user": "u", "team": "t"}
REPORT_MAX_BUCKETS = 1000
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "spend")

# Add a batch's counts to one usage bucket (a hash, KEYS[1]). ARGV: lifetime (s), most models,
# most end users, then per group: field, requests, prompt tokens, completion tokens, spend
# (nano-dollars). A field holds "requests prompt completion n<spend>" (one field per group, not
# four: a quarter of the memory). A model or end user new to a bucket that already counts the most it may is
# added to the "other" field of its kind ("m~", "u~"); "#m"/"#u" count the distinct ones.
_ADD_USAGE = """
local most = {m = tonumber(ARGV[2]), u = tonumber(ARGV[3])}
for i = 4, #ARGV, 5 do
  local field = ARGV[i]
  local kind = string.sub(field, 1, 1)
  local old = redis.call('HGET', KEYS[1], field)
  if not old and most[kind] then
    if tonumber(redis.call('HGET', KEYS[1], '#' .. kind) or '0') >= most[kind] then
      field = kind .. '~'
      old = redis.call('HGET', KEYS[1], field)
    else
      redis.call('HINCRBY', KEYS[1], '#' .. kind, 1)
    end
  end
  local r, p, c, s = 0, 0, 0, 0
  if old then
    local a, b, d, e = string.match(old, '^(%S+) (%S+) (%S+) (%S+)$')
    r, p, c = tonumber(a), tonumber(b), tonumber(d)
    s = tonumber(string.match(e, '^n(%d+)$') or '')
    if not s then s = math.floor((tonumber(e) or 0) * 1e9 + 0.5) end  -- the previous version's dollars
  end
  redis.call('HSET', KEYS[1], field, string.format('%d %d %d n%.0f', r + tonumber(ARGV[i + 1]),
    p + tonumber(ARGV[i + 2]), c + tonumber(ARGV[i + 3]), s + tonumber(ARGV[i + 4])))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


def clip(value, limit: int):
    return value[:limit] + "…" if isinstance(value, str) and len(value) > limit else value


class UsageCounters:
    def __init__(self, client, names, limits):
        self.redis = client
        self.names = names
        self.limits = limits  # gateway.usage.spendlog.LogLimits: lifetimes and per-bucket caps

    @staticmethod
    def count(buckets: dict, entry: dict) -> None:
        """Add one entry to the hour and day buckets of the time it started, per key, model, end user."""
        at = entry.get("start_time") or time.time()
        spend = to_nanos(entry.get("spend") or 0)
        groups = ["k|" + (entry.get("token") or MASTER_BUCKET)]
        groups += [f"{kind}|{clip(entry[name], 256)}" for kind, name in (("m", "model"), ("u", "end_user"),
                                                                        ("t", "team_id"))
                   if entry.get(name)]
        for interval, seconds in INTERVALS.items():
            bucket = buckets.setdefault((interval, int(at // seconds) * seconds), {})
            for field in groups:
                counts = bucket.setdefault(field, [0, 0, 0, 0])
                counts[0] += 1
                counts[1] += entry.get("prompt_tokens") or 0
                counts[2] += entry.get("completion_tokens") or 0
                counts[3] += spend

    def queue(self, pipe, buckets: dict) -> None:
        """One EVAL per bucket a batch touched: the script text and its one key, which a cluster
        pipeline routes by that key (it refuses EVALSHA, and its `eval` method is something else,
        hence execute_command)."""
        limits = self.limits
        lifetimes = {"hour": limits.hour_buckets_ttl, "day": limits.day_buckets_ttl}
        for (interval, start), groups in buckets.items():
            if not lifetimes[interval]:
                continue
            args = [lifetimes[interval], limits.bucket_models, limits.bucket_end_users]
            for field, (requests, prompt, completion, spend) in groups.items():
                args += [field, requests, prompt, completion, spend]
            pipe.execute_command("EVAL", _ADD_USAGE, 1, self.names.usage_bucket(interval, start), *args)

    def report(self, group_by: str, interval: str, start: float, end: float, limit: int = 100) -> dict:
        """Per group (key token or "master", model, end user): requests, tokens and spend
        (nano-dollars) per bucket from `start` to `end`, read from the usage counters only. The
        `limit` groups with the most spend are listed; the rest, and what a bucket counted as
        "other", are summed in one series with "other": true."""
        starts = bucket_starts(interval, start, end)
        pipe = self.redis.pipeline(transaction=False)
        for bucket in starts:
            pipe.hgetall(self.names.usage_bucket(interval, bucket))
        kind = GROUPINGS[group_by]
        per_group: dict = {}
        for position, raw in enumerate(pipe.execute() if starts else []):
            for field, value in raw.items():
                if field == kind + "~":
                    group = None
                elif field.startswith(kind + "|"):
                    group = field[2:]
                else:
                    continue
                counts = per_group.setdefault(group, [[0] * len(starts) for _ in COUNTS])
                for series, number in zip(counts, _counts(value)):
                    series[position] = number
        return {"group_by": group_by, "interval": interval, "start": iso(starts[0]),
                "end": iso(starts[-1] + INTERVALS[interval]), "buckets": [iso(s) for s in starts],
                "series": _top_series(per_group, limit, len(starts))}


    def key_report(self, tokens: list[str], interval: str, start: float, end: float) -> dict:
        """One key's requests, tokens and spend (nano-dollars) per bucket (summed over `tokens`:
        the key and the copies it was regenerated from), read from the usage counters only."""
        starts = bucket_starts(interval, start, end)
        fields = ["k|" + token for token in tokens]
        pipe = self.redis.pipeline(transaction=False)
        for bucket in starts:
            pipe.hmget(self.names.usage_bucket(interval, bucket), fields)
        counts = [[0] * len(starts) for _ in COUNTS]
        for position, values in enumerate(pipe.execute() if starts else []):
            for value in values:
                if value:
                    for series, number in zip(counts, _counts(value)):
                        series[position] += number
        report = _series(None, counts, False)
        del report["group"], report["other"]
        return {"interval": interval, "start": iso(starts[0]), "end": iso(starts[-1] + INTERVALS[interval]),
                "buckets": [iso(s) for s in starts], **report}


def bucket_starts(interval: str, start: float, end: float) -> list[int]:
    """The starts (epoch, UTC-aligned) of the buckets from `start` to `end`; 400 if too many."""
    if interval not in INTERVALS:
        raise GatewayError(400, "interval: must be hour or day", param="interval")
    seconds = INTERVALS[interval]
    first, last = int(start // seconds) * seconds, int(end // seconds) * seconds
    if (last - first) // seconds + 1 > REPORT_MAX_BUCKETS:
        raise GatewayError(400, f"start_date: a report covers at most {REPORT_MAX_BUCKETS} {interval}s",
                           param="start_date")
    return list(range(first, last + 1, seconds))


def _top_series(per_group: dict, limit: int, length: int) -> list[dict]:
    """The `limit` groups with the most spend (then requests), then one "other" series for the rest."""
    other = per_group.pop(None, None)
    ranked = sorted(per_group.items(), key=lambda item: (-sum(item[1][3]), -sum(item[1][0]), item[0]))
    for _, counts in ranked[limit:]:
        other = other or [[0] * length for _ in COUNTS]
        for summed, series in zip(other, counts):
            summed[:] = [a + b for a, b in zip(summed, series)]
    shown = [_series(group, counts, False) for group, counts in ranked[:limit]]
    return shown + ([_series(None, other, True)] if other else [])


def _counts(value: str) -> tuple[int, int, int, int]:
    """(requests, prompt, completion, spend in nano-dollars) of one bucket field."""
    requests, prompt, completion, spend = value.split(" ")
    spend = int(spend[1:]) if spend.startswith("n") else legacy_nanos(spend)
    return int(requests), int(prompt), int(completion), spend


def in_dollars(report: dict) -> dict:
    """A report (or one series, as key_report returns it) as the API shows it: spend in dollars."""
    if "series" in report:
        return {**report, "series": [in_dollars(series) for series in report["series"]]}
    return {**report, "spend": [as_json(s) for s in report["spend"]],
            "totals": {**report["totals"], "spend": as_json(report["totals"]["spend"])}}


def _series(group, counts: list, other: bool) -> dict:
    requests, prompt, completion, spend = counts
    total = [p + c for p, c in zip(prompt, completion)]
    return {"group": group, "other": other, "requests": requests, "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": total, "spend": spend,
            "totals": {"requests": sum(requests), "prompt_tokens": sum(prompt),
                       "completion_tokens": sum(completion), "total_tokens": sum(total),
                       "spend": sum(spend)}}
