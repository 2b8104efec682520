"""The audit log: who changed which virtual key, when, and which fields.

Every admin change (generate, update, block, unblock, regenerate, delete) adds one entry, written
by the key store right after the change succeeded, so there is no entry for a change that did
not happen. (The stream lives in a slot of its own, so on a sharded Redis it cannot share the
change's transaction: a Redis failure between the two loses the entry, never the change.)

Stored in one Redis stream (`<prefix>audit`); the stream id is the time of the change. Bounded
two ways, without a setting: at most MAX_ENTRIES entries (approximate trimming, so a little
more for a moment) and none older than MAX_AGE_DAYS. Values are capped at VALUE_CHARS each, so
an entry stays under ~4 KB even with a large `metadata`: the stream is at most ~40 MB and
typically ~4 MB (≈400 bytes an entry).

A plaintext key is never recorded: a custom `key`/`new_key` appears only as `custom_key: true`.
"""
from __future__ import annotations

import json
import time

from gateway.core.redisnames import RedisNames
from gateway.core.timefmt import iso

ACTIONS = ("generate", "update", "block", "unblock", "regenerate", "delete",
           # Team changes (gateway/teams/store.py): `token` null, `team_id` and `team_alias` set.
           "team_new", "team_update", "team_block", "team_unblock", "team_delete")
MAX_ENTRIES = 10_000
MAX_AGE_DAYS = 90
VALUE_CHARS = 200
SECRET_FIELDS = frozenset({"key", "new_key"})


def recorded_value(value):
    """The value as recorded: itself when small, else a note of its size (never truncated JSON)."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    return value if len(text) <= VALUE_CHARS else f"<{len(text)} characters, not recorded>"


def recorded_changes(changes: dict | None) -> dict:
    return {field: recorded_value(value) for field, value in (changes or {}).items()
            if field not in SECRET_FIELDS}


class AuditLog:
    def __init__(self, client, names: RedisNames):
        self.redis = client
        self.stream = names.audit_log

    def add(self, pipe, action: str, caller: str, record: dict, changes: dict | None = None, **extra) -> None:
        """Add one entry through `pipe` (the client, or a pipeline the caller executes)."""
        entry = {"action": action, "caller": caller, "token": record["token"],
                 "key_alias": record.get("key_alias"), "changes": recorded_changes(changes)}
        entry.update({k: v for k, v in extra.items() if k not in SECRET_FIELDS})
        pipe.xadd(self.stream, {"e": json.dumps(entry, separators=(",", ":"), default=str)},
                  maxlen=MAX_ENTRIES, approximate=True)
        oldest_ms = int((time.time() - MAX_AGE_DAYS * 86400) * 1000)
        pipe.xtrim(self.stream, minid=oldest_ms, approximate=True)

    def query(self, *, token=None, key_alias=None, action=None, caller=None, start=None, end=None,
              page: int = 1, size: int = 50) -> dict:
        """Newest first; `start`/`end` are epoch seconds (inclusive). Raises Redis errors."""
        high = str(int(end * 1000)) if end is not None else "+"
        low = str(int(start * 1000)) if start is not None else "-"
        wanted = {"token": token, "key_alias": key_alias, "action": action, "caller": caller}
        matches = []
        for entry_id, fields in self.redis.xrevrange(self.stream, max=high, min=low):
            entry = json.loads(fields["e"])
            if all(v is None or entry.get(k) == v for k, v in wanted.items()):
                matches.append(self._shown(entry_id, entry))
        total = len(matches)
        return {"logs": matches[(page - 1) * size: page * size], "total_count": total,
                "current_page": page, "total_pages": (total + size - 1) // size}

    @staticmethod
    def _shown(entry_id: str, entry: dict) -> dict:
        millis = int(entry_id.split("-", 1)[0])
        return {"id": entry_id, "time": iso(millis / 1000, "milliseconds"), **entry}
