"""The spend log (one entry per /vllm request), its indexes, usage counters and end-user usage.

Filtered queries must not walk the whole log (2.1 s at 200k entries), so each entry is written
to the global stream and to small indexes beside it, in the accounting batch's pipeline:
- the key's stream `log:{token}` (capped at LogLimits.key_entries, expires key_ttl after its
  last write) and the end user's list `eu-log:<end user>` (newest first, a smaller cap,
  end_user_ttl): a filter by key, alias or end user reads only that index. End users get a list,
  not a stream: callers choose end-user ids, and a stream holding one entry takes 4.7 KB
  (its first node is preallocated), a list 650 B;
- request ids: a request id hashes to one of a fixed number of lists (`req:#<n>`), each keeping
  its newest entries, so lookups cover about the last `request_ids` requests (by default as
  many as the global stream keeps) and the memory is bounded by count, not by traffic x lifetime: a key per request id
  with a one-day lifetime cost ~600 B per request per day (5 GB/day at 100 requests/s).
  Callers choose X-Request-Id, so several requests may share one: all of them are found.
  Entries read from a list have no stream id ("id" is null);
- usage counters per hour and per day (`usage:<interval>:<start>`, one hash per bucket with one
  field per key, model and end user), which a usage report reads without touching the log.
Every one of them is a single key written by single-key commands (EVAL with its one key for
the counters, never EVALSHA), so the batch works on a Redis Cluster pipeline.

Memory stays bounded however callers behave: an entry is at most ENTRY_MAX_BYTES and stores
nothing derivable; the global stream keeps SPEND_LOG_MAX_ENTRIES; per-key streams and the
request-id lists are capped; end-user lists (callers choose end-user ids) are capped and expire
after their last write, so at worst they hold (requests in that lifetime) x (entry size); a bucket
counts at most `bucket_models` models and `bucket_end_users` end users, the rest under one
"other" field. End-user usage is kept per (key, end user) in a hash that expires
END_USER_STATS_TTL after its last request, with an index per end user of the keys (or
"master") that used it, so one tenant's traffic never shows in another's totals.

Accounting (gateway/usage/accounting.py) queues a batch's writes on its pipeline through
`queue_batch`; the views read through `query`, `usage_report` and `end_user_totals`.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass

from gateway.core.errors import GatewayError
from gateway.core.timefmt import iso

MASTER_BUCKET = "master"  # end-user stats and usage of master-key requests (they have no token)
ENTRY_MAX_BYTES = 1024
# Caller-chosen free text in a spend-log entry: clipped to this many characters.
CLIP = {"route": 200, "error": 200}
# Fields a reader can rebuild, so the log does not store them (see _log_entry).
DERIVED = ("total_tokens", "end_time", "caller")
DAY = 86400
INTERVALS = {"hour": 3600, "day": DAY}
GROUPINGS = {"key": "k", "model": "m", "end_user": "u"}  # usage-bucket field prefix of each grouping
REPORT_MAX_BUCKETS = 1000
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "spend")
# Below this cap a stream is trimmed exactly: approximate trimming only drops whole nodes of
# 100 entries, so a cap of 20 would hold ~100.
EXACT_TRIM_BELOW = 1000
WALK_BATCH = 500
# Request-id lists: one per REQUEST_IDS_PER_LIST requests of capacity, each keeping 1.5x that
# (hashing is uneven), so at least the last `request_ids` requests are almost always found.
REQUEST_IDS_PER_LIST = 64
REQUEST_LIST_KEEP = 96
REQUEST_LIST_TTL = 30 * DAY  # only so that lists of a gateway no longer running go away
STREAM, LIST = "stream", "list"


@dataclass(frozen=True)
class LogLimits:
    """Caps and lifetimes of the indexes and counters (0 entries or 0 seconds: not kept)."""

    key_entries: int = 10_000        # per-key stream cap (~5 MB for a busy key)
    key_ttl: int = 30 * DAY          # a key's stream lives this long after its last entry
    end_user_entries: int = 1_000    # per-end-user list cap
    end_user_ttl: int = 7 * DAY      # an end user's list lives this long after its last entry
    # Recent requests findable by request id; None: as many as the global stream keeps
    # (SPEND_LOG_MAX_ENTRIES). 0: request-id lookups walk the global stream. Changing it
    # re-hashes the ids: lookups of requests logged before the change find nothing.
    request_ids: int | None = None
    hour_buckets_ttl: int = 8 * DAY
    day_buckets_ttl: int = 400 * DAY
    bucket_models: int = 200         # distinct models one bucket counts separately
    bucket_end_users: int = 1_000    # distinct end users one bucket counts separately


# Add a batch's counts to one usage bucket (a hash, KEYS[1]). ARGV: lifetime (s), most models,
# most end users, then per group: field, requests, prompt tokens, completion tokens, spend.
# A field holds "requests prompt completion spend" (one field per group, not four: a quarter
# of the memory). A model or end user new to a bucket that already counts the most it may is
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
    r, p, c, s = tonumber(a), tonumber(b), tonumber(d), tonumber(e)
  end
  redis.call('HSET', KEYS[1], field, string.format('%d %d %d %.17g', r + tonumber(ARGV[i + 1]),
    p + tonumber(ARGV[i + 2]), c + tonumber(ARGV[i + 3]), s + tonumber(ARGV[i + 4])))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class SpendLog:
    def __init__(self, client, names, max_entries: int, end_user_ttl: float = 30 * DAY,
                 limits: LogLimits | None = None):
        self.redis = client
        self.names = names
        self.max_entries = max_entries
        self.end_user_ttl = int(end_user_ttl)
        self.limits = limits or LogLimits()
        self.request_ids = max_entries if self.limits.request_ids is None else self.limits.request_ids

    # -- writing ----------------------------------------------------------------------------
    def queue_batch(self, pipe, entries: list[dict]) -> None:
        """Queue on `pipe` a batch's log entries, their indexes, usage counters and end users' totals.
        Single-key commands only: `pipe` may be a (non-transactional) Redis Cluster pipeline."""
        end_users, buckets, expiring = {}, {}, {}
        for entry in entries:
            end_user = entry.get("end_user")
            if end_user:
                total = end_users.setdefault((entry.get("token") or MASTER_BUCKET, end_user), [0, 0, 0, 0.0, 0.0])
                total[0] += 1
                total[1] += entry["prompt_tokens"]
                total[2] += entry["completion_tokens"]
                total[3] += entry["spend"]
                total[4] = max(total[4], entry["end_time"])
            # One JSON field per entry: packing 20 separate fields cost ~5% of a worker (py-spy).
            stored = {"e": stored_entry(entry)}
            pipe.xadd(self.names.spend_log, stored, maxlen=self.max_entries, approximate=True)
            self._queue_indexes(pipe, entry, stored, expiring)
            _count_usage(buckets, entry)
        for name, (seconds, keep) in expiring.items():  # once per index a batch wrote, not per entry
            if keep:
                pipe.ltrim(name, 0, keep - 1)
            pipe.expire(name, seconds)
        self._queue_end_users(pipe, end_users)
        self._queue_usage(pipe, buckets)

    def _queue_indexes(self, pipe, entry: dict, stored: dict, expiring: dict) -> None:
        """The entry's copies in its key's and end user's streams and under its request id."""
        limits, token = self.limits, entry.get("token")
        end_user, request_id = entry.get("end_user"), entry.get("request_id")
        if token and limits.key_entries:
            name = self.names.key_log(token)
            _capped_xadd(pipe, name, stored, limits.key_entries)
            expiring[name] = (limits.key_ttl, None)
        if end_user and limits.end_user_entries:
            name = self.names.end_user_log(_clip(end_user, 256))
            pipe.lpush(name, stored["e"])
            expiring[name] = (limits.end_user_ttl, limits.end_user_entries)
        if request_id and self.request_ids:
            name = self._request_list(_clip(request_id, 256))
            pipe.lpush(name, stored["e"])
            expiring[name] = (REQUEST_LIST_TTL, REQUEST_LIST_KEEP)

    def _queue_end_users(self, pipe, end_users: dict) -> None:
        """Per (key, end user) totals of a batch; both the hash and the index live
        END_USER_STATS_TTL after the last request."""
        for (bucket, end_user), (requests, prompt, completion, spend, last) in end_users.items():
            name = self.names.end_user_stats(bucket, end_user)
            pipe.hincrby(name, "requests", requests)
            pipe.hincrby(name, "prompt_tokens", prompt)
            pipe.hincrby(name, "completion_tokens", completion)
            pipe.hincrbyfloat(name, "spend", spend)
            pipe.hset(name, "last_seen", iso(last))
            pipe.expire(name, self.end_user_ttl)
            index = self.names.end_user_keys(end_user)
            pipe.zadd(index, {bucket: last})
            pipe.expire(index, self.end_user_ttl)

    def _queue_usage(self, pipe, buckets: dict) -> None:
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
                args += [field, requests, prompt, completion, repr(spend)]
            pipe.execute_command("EVAL", _ADD_USAGE, 1, self.names.usage_bucket(interval, start), *args)

    # -- reading the log -------------------------------------------------------------------
    def query(self, *, token=None, key_alias=None, end_user=None, request_id=None,
              start: float | None = None, end: float | None = None, page=1, size=50) -> dict:
        """Newest first. A filtered query reads the most selective index (request id, then the
        shorter of the key's and end user's streams) and checks the other filters on what it
        reads; without filters (or with a time range only) it walks the global stream."""
        alias_token = self.redis.get(self.names.alias(key_alias)) if key_alias else None
        wanted = _Filter(token, key_alias, alias_token, end_user, request_id)
        skip, found, more = (page - 1) * size, [], False
        for entry_id, fields in self._candidates(wanted, start, end, skip + size + 1):
            if not wanted.matches(fields):
                continue
            if skip:
                skip -= 1
            elif len(found) < size:
                found.append(_log_entry(entry_id, fields))
            else:
                more = True
                break
        return {"logs": found, "page": page, "size": size, "has_more": more}

    def _candidates(self, wanted: "_Filter", start, end, needed: int):
        """(id, fields) newest first from the smallest source that holds every match. A request
        id whose list expired is still found through the key's or end user's index if given."""
        indexes = wanted.indexes(self.names, self.limits)
        if wanted.request_id and self.request_ids:
            found = list(self._walk_list(self._request_list(wanted.request_id), start, end, REQUEST_LIST_KEEP))
            found = [(i, fields) for i, fields in found if fields.get("request_id") == wanted.request_id]
            if found or not indexes:
                return iter(found)
        if indexes:
            kind, name = self._shortest(indexes)
            return self._walk(name, start, end, needed) if kind == STREAM else self._walk_list(name, start, end, needed)
        if wanted.key_alias and not wanted.token:
            return iter(())  # an alias no key holds: nothing indexed under it (query by key=<token>)
        return self._walk(self.names.spend_log, start, end, needed)

    def _request_list(self, request_id: str) -> str:
        """The list a request id hashes to (crc32: the same in every process and gateway)."""
        lists = max(1, -(-self.request_ids // REQUEST_IDS_PER_LIST))
        return self.names.request_list(zlib.crc32(request_id.encode()) % lists)

    def _shortest(self, indexes: list[tuple[str, str]]) -> tuple[str, str]:
        if len(indexes) == 1:
            return indexes[0]
        pipe = self.redis.pipeline(transaction=False)
        for kind, name in indexes:
            pipe.xlen(name) if kind == STREAM else pipe.llen(name)
        return min(zip(pipe.execute(), indexes))[1]

    def _walk(self, stream: str, start, end, needed: int):
        """A stream's entries newest first between `start` and `end` (its ids' times), in batches."""
        upper = "+" if end is None else str(int(end * 1000))
        lower = "-" if start is None else str(int(start * 1000))
        count = min(WALK_BATCH, max(needed, 10))
        while True:
            batch = self.redis.xrevrange(stream, upper, lower, count=count)
            for entry_id, raw in batch:
                yield entry_id, json.loads(raw["e"])
            if len(batch) < count:
                return
            upper, count = "(" + batch[-1][0], WALK_BATCH

    def _walk_list(self, name: str, start, end, needed: int):
        """A list index's entries (newest first) whose end time is between `start` and `end`.
        They carry no stream id: "id" is null."""
        first, count = 0, min(WALK_BATCH, max(needed, 10))
        while True:
            batch = self.redis.lrange(name, first, first + count - 1)
            for raw in batch:
                fields = json.loads(raw)
                finished = (fields.get("start_time") or 0) + (fields.get("duration_ms") or 0) / 1000
                if (start is None or finished >= start) and (end is None or finished <= end):
                    yield None, fields
            if len(batch) < count:
                return
            first, count = first + count, WALK_BATCH

    # -- reading counters --------------------------------------------------------------------
    def usage_report(self, group_by: str, interval: str, start: float, end: float, limit: int = 100) -> dict:
        """Per group (key token or "master", model, end user): requests, tokens and spend per
        bucket from `start` to `end`, read from the usage counters only. The `limit` groups
        with the most spend are listed; the rest, and what a bucket counted as "other", are
        summed in one series with "other": true."""
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
                requests, prompt, completion, spend = value.split(" ")
                for series, number in zip(counts, (int(requests), int(prompt), int(completion), float(spend))):
                    series[position] = number
        return {"group_by": group_by, "interval": interval, "start": iso(starts[0]),
                "end": iso(starts[-1] + INTERVALS[interval]), "buckets": [iso(s) for s in starts],
                "series": _top_series(per_group, limit, len(starts))}

    # -- end users ---------------------------------------------------------------------------
    def end_user_totals(self, end_user: str) -> dict | None:
        """An end user's usage per key ("master" for the master key) and summed over them."""
        index = self.names.end_user_keys(end_user)
        self.redis.zremrangebyscore(index, "-inf", time.time() - self.end_user_ttl)
        buckets = self.redis.zrange(index, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.hgetall(self.names.end_user_stats(bucket, end_user))
        per_key = {bucket: _usage(raw) for bucket, raw in zip(buckets, pipe.execute() if buckets else []) if raw}
        if not per_key:
            return None
        summed = {name: sum(u[name] for u in per_key.values())
                  for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "spend")}
        return {"end_user_id": end_user, **summed,
                "last_seen": max(u["last_seen"] or "" for u in per_key.values()) or None, "keys": per_key}


class _Filter:
    """The filters of one query, checked on each entry read."""

    def __init__(self, token, key_alias, alias_token, end_user, request_id):
        self.token, self.key_alias, self.alias_token = token, key_alias, alias_token
        self.end_user, self.request_id = end_user, request_id

    def matches(self, fields: dict) -> bool:
        if self.token and fields.get("token") != self.token:
            return False
        # An alias filter matches the key holding the alias now and entries logged under it.
        if self.key_alias and fields.get("key_alias") != self.key_alias \
                and (self.alias_token is None or fields.get("token") != self.alias_token):
            return False
        if self.end_user and fields.get("end_user") != self.end_user:
            return False
        return not self.request_id or fields.get("request_id") == self.request_id

    def indexes(self, names, limits: LogLimits) -> list[tuple[str, str]]:
        """(STREAM or LIST, name) of the indexes holding every entry this filter can match (any one will do)."""
        found = []
        if limits.key_entries:
            found += [(STREAM, names.key_log(t)) for t in {self.token, self.alias_token} if t]
        if self.end_user and limits.end_user_entries:
            found.append((LIST, names.end_user_log(self.end_user)))
        return found


def _capped_xadd(pipe, name: str, stored: dict, cap: int) -> None:
    pipe.xadd(name, stored, maxlen=cap, approximate=cap >= EXACT_TRIM_BELOW)


def _count_usage(buckets: dict, entry: dict) -> None:
    """Add one entry to the hour and day buckets of the time it started, per key, model, end user."""
    at = entry.get("start_time") or time.time()
    groups = ["k|" + (entry.get("token") or MASTER_BUCKET)]
    groups += [f"{kind}|{_clip(entry[name], 256)}" for kind, name in (("m", "model"), ("u", "end_user"))
               if entry.get(name)]
    for interval, seconds in INTERVALS.items():
        bucket = buckets.setdefault((interval, int(at // seconds) * seconds), {})
        for field in groups:
            counts = bucket.setdefault(field, [0, 0, 0, 0.0])
            counts[0] += 1
            counts[1] += entry.get("prompt_tokens") or 0
            counts[2] += entry.get("completion_tokens") or 0
            counts[3] += entry.get("spend") or 0.0


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


def _series(group, counts: list, other: bool) -> dict:
    requests, prompt, completion, spend = counts
    spend = [round(s, 10) for s in spend]
    total = [p + c for p, c in zip(prompt, completion)]
    return {"group": group, "other": other, "requests": requests, "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": total, "spend": spend,
            "totals": {"requests": sum(requests), "prompt_tokens": sum(prompt),
                       "completion_tokens": sum(completion), "total_tokens": sum(total),
                       "spend": round(sum(spend), 10)}}


def _usage(raw: dict) -> dict:
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"requests": int(raw.get("requests", 0)), "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "spend": float(raw.get("spend", 0)),
            "last_seen": raw.get("last_seen")}


def _clip(value, limit: int):
    return value[:limit] + "…" if isinstance(value, str) and len(value) > limit else value


def stored_entry(entry: dict) -> str:
    """The spend-log JSON of one request: no derivable or null fields, caller-chosen text clipped,
    at most ENTRY_MAX_BYTES (the longest strings are cut further if it is still larger)."""
    kept = {name: _clip(value, CLIP.get(name, 256)) for name, value in entry.items()
            if value is not None and name not in DERIVED}
    if entry.get("caller") not in (None, _caller(kept)):
        kept["caller"] = _clip(entry["caller"], 64)
    for name in ("start_time", "spend"):
        if isinstance(kept.get(name), float):
            kept[name] = round(kept[name], 6) if name == "start_time" else float(f"{kept[name]:.10g}")
    text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    while len(text.encode()) > ENTRY_MAX_BYTES:
        longest = max((n for n, v in kept.items() if isinstance(v, str)), key=lambda n: len(kept[n]))
        kept[longest] = _clip(kept[longest], len(kept[longest]) // 2)
        text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    return text


def _caller(fields: dict) -> str:
    """The access log's caller label, rebuilt from the entry (as keys.auth.Identity.label)."""
    token = fields.get("token")
    if not token:
        return "master"
    return f"key:{fields['key_alias']}" if fields.get("key_alias") else f"key:{token[:12]}"


def _log_entry(entry_id: str | None, fields: dict) -> dict:
    out = {name: None for name in ("token", "key_alias", "end_user", "model", "upstream_status", "ttfb_ms",
                                   "error")}
    out.update({"id": entry_id, **fields})
    out.setdefault("caller", _caller(fields))
    prompt, completion = out.get("prompt_tokens") or 0, out.get("completion_tokens") or 0
    out["total_tokens"] = prompt + completion
    if out.get("start_time") is not None and out.get("duration_ms") is not None:
        out["end_time"] = round(out["start_time"] + out["duration_ms"] / 1000, 6)
    for name in ("start_time", "end_time"):
        if out.get(name) is not None:
            out[name + "_iso"] = iso(out[name], "milliseconds")
    return out
