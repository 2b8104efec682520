"""The spend log (one entry per /vllm request) and end-user usage: writing and reading.

Memory: a spend-log entry stores only what cannot be derived (no total_tokens, end_time or
caller, no null fields), caller-chosen strings are clipped, and one entry is at most
ENTRY_MAX_BYTES; the stream is capped at SPEND_LOG_MAX_ENTRIES, so it stays below
entries × ENTRY_MAX_BYTES. End-user usage is kept per (key, end user) in a hash that expires
END_USER_STATS_TTL after its last request, with an index per end user of the keys (or "master")
that used it, so one tenant's traffic never shows in another's totals and nothing lives forever.

Accounting (gateway/usage/accounting.py) queues a batch's writes on its pipeline through
`queue_batch`; the views read through `query` and `end_user_totals`.
"""
from __future__ import annotations

import json
import time

from gateway.core.timefmt import iso

MASTER_BUCKET = "master"  # end-user stats of master-key requests (they have no token)
ENTRY_MAX_BYTES = 1024
# Caller-chosen free text in a spend-log entry: clipped to this many characters.
CLIP = {"route": 200, "error": 200}
# Fields a reader can rebuild, so the log does not store them (see _log_entry).
DERIVED = ("total_tokens", "end_time", "caller")


class SpendLog:
    def __init__(self, client, names, max_entries: int, end_user_ttl: float = 30 * 86400):
        self.redis = client
        self.names = names
        self.max_entries = max_entries
        self.end_user_ttl = int(end_user_ttl)

    def queue_batch(self, pipe, entries: list[dict]) -> None:
        """Queue on `pipe` the log entries of a batch of finished requests and their end users' totals."""
        end_users = {}
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
            pipe.xadd(self.names.spend_log, {"e": stored_entry(entry)}, maxlen=self.max_entries, approximate=True)
        self._queue_end_users(pipe, end_users)

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

    # -- reading --------------------------------------------------------------------------
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

    def query(self, *, token=None, key_alias=None, end_user=None, request_id=None,
                   start: float | None = None, end: float | None = None, page=1, size=50) -> dict:
        """Newest first; filters applied while walking the stream backwards in batches."""
        upper = "+" if end is None else str(int(end * 1000))
        lower = "-" if start is None else str(int(start * 1000))
        skip, wanted, found, more = (page - 1) * size, size, [], False
        while True:
            batch = self.redis.xrevrange(self.names.spend_log, upper, lower, count=500)
            for entry_id, raw in batch:
                fields = json.loads(raw["e"])
                if ((token and fields.get("token") != token) or (key_alias and fields.get("key_alias") != key_alias)
                        or (end_user and fields.get("end_user") != end_user)
                        or (request_id and fields.get("request_id") != request_id)):
                    continue
                if skip:
                    skip -= 1
                elif len(found) < wanted:
                    found.append(_log_entry(entry_id, fields))
                else:
                    more = True
                    break
            if more or len(batch) < 500:
                break
            upper = "(" + batch[-1][0]
        return {"logs": found, "page": page, "size": size, "has_more": more}


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


def _log_entry(entry_id: str, fields: dict) -> dict:
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
