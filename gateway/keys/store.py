"""Virtual keys in Redis: only sha256(key) is stored, lifetimes are Redis TTLs.

Layout under the prefix (default `vgw:`):
  key:<token>      JSON record of the key, PX = remaining lifetime (none when it never expires)
  alias:<alias>    token owning the alias, same lifetime as the key
  gone:<token>     why a key no longer works ("expired" / "regenerated"), kept 30 days longer,
                   so a caller hears "expired" rather than "invalid"; it holds no key material
  keys             sorted set token -> expiry epoch (inf = never), for listing without KEYS
Multi-key changes run in WATCH/MULTI transactions, so no concurrent admin call loses a write;
each change queues its audit entry (gateway/keys/audit.py) in the same transaction.

A key and the copies it was regenerated from are one logical key. `/key/regenerate` with a grace
period leaves the old key working for a while: the new record (the head) lists its live
predecessors in `previous_tokens` (token -> end of grace), and each old record is a copy of the
head marked `status: "superseded"`, `superseded_by: <head token>`, with its own true expiry.
Every write (update, block, delete, regenerate) resolves the head and rewrites or removes every
live copy with it, so revoking a key also revokes the copies still in their grace period; the
copies' requests are charged to the head (one budget, one rate limit).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import time

import redis

from gateway.keys.audit import AuditLog
from gateway.keys.auth import Identity, hash_key
from gateway.core.durations import parse_duration
from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.core.timefmt import iso
from gateway.keys.cache import KeyCache
from gateway.core.redisnames import RedisNames
from gateway.core.runtime import gevent_patched

log = logging.getLogger("gateway")
GONE_RETENTION_MS = 30 * 86400 * 1000
SUPERSEDED = "superseded"
# Fields only the head carries; a superseded copy has its own token, name and lifetime.
_HEAD_ONLY = ("previous_tokens", "superseded_by", "status")
_TOKEN = re.compile(r"[0-9a-f]{64}")


def key_name(key: str) -> str:
    return f"sk-...{key[-4:]}"


def new_key() -> str:
    # 32 random bytes = 256 bits, above the 128 the product promises.
    return "sk-" + secrets.token_urlsafe(32)


class KeyStore:
    """CRUD and authentication for virtual keys."""

    def __init__(self, client: redis.Redis, names: RedisNames, cache_ttl: float = 0.9,
                 cache: bool | None = None, audit: AuditLog | None = None):
        self.redis = client
        self.names = names
        self.audit = audit or AuditLog(client, names)
        # The cache is for gevent workers, where a listener greenlet hears other workers'
        # changes; elsewhere (tests, dev server) every request reads Redis.
        use_cache = (gevent_patched() if cache is None else cache) and cache_ttl > 0
        self.cache = KeyCache(client, names.key_changes, cache_ttl) if use_cache else None
        self.index = names.key_index
        self.record_key = names.record
        self.alias_key = names.alias
        self.gone_key = names.gone

    @staticmethod
    def token_of(key_or_token: str) -> str:
        """Accept the plaintext key or its token, as LiteLLM's /key/info does."""
        if _TOKEN.fullmatch(key_or_token):
            return key_or_token
        return hash_key(key_or_token)

    # -- reading ----------------------------------------------------------------------------
    def ping(self) -> tuple[bool, str]:
        try:
            self.redis.ping()
        except REDIS_ERRORS as exc:
            return False, type(exc).__name__
        return True, "PONG"

    def get(self, token: str) -> dict | None:
        try:
            raw = self.redis.get(self.record_key(token))
        except REDIS_ERRORS:
            raise unavailable() from None
        return json.loads(raw) if raw else None

    def find(self, key: str | None = None, alias: str | None = None) -> dict:
        """The record for a key/token or an alias; 404 when there is none."""
        try:
            if key is not None:
                token = self.token_of(key)
            else:
                token = self.redis.get(self.alias_key(alias))
        except REDIS_ERRORS:
            raise unavailable() from None
        record = self.get(token) if token else None
        if record is None:
            what = f"key_alias {alias!r}" if key is None else "key"
            raise GatewayError(404, f"no such {what} (it may have expired or been deleted)", "not_found_error",
                               param="key" if key is not None else "key_alias")
        return record

    def authenticate(self, credential: str) -> Identity:
        """The key's record and budget-period spend: from the cache, else one Redis round trip."""
        token = hash_key(credential)
        hit = self.cache.get(token) if self.cache is not None else None
        if hit is not None:
            return self._check(token, *hit)
        if self.cache is not None:
            self.cache.listen_in_background()
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.record_key(token))
            pipe.get(self.gone_key(token))
            pipe.hmget(self.names.key_spend(token), "budget_period", "budget_spend")
            raw, gone, budget = pipe.execute()
        except REDIS_ERRORS:
            raise unavailable() from None
        if raw is None:
            if gone == "expired":
                raise GatewayError(401, "API key expired", "expired_key", kind="expired_key")
            if gone == "regenerated":
                raise GatewayError(401, "API key was regenerated; use the new key", "auth_error",
                                   kind="regenerated_key")
            raise GatewayError(401, "Invalid API key", "auth_error", kind="invalid_key")
        record, budget = json.loads(raw), tuple(budget)
        if record.get("superseded_by"):  # an old copy in its grace period spends the head's budget
            budget = self._budget(record["superseded_by"])
        if self.cache is not None:
            self.cache.put(token, record, budget)
        return self._check(token, record, budget)

    @staticmethod
    def _check(token: str, record: dict, budget: tuple) -> Identity:
        expires_at = record.get("expires_at")
        if expires_at is not None and time.time() >= expires_at:
            raise GatewayError(401, f"API key expired at {record['expires']}", "expired_key", kind="expired_key")
        if record.get("blocked"):
            raise GatewayError(401, "API key is blocked", "auth_error", kind="blocked_key")
        # Requests on a superseded copy count against the logical key: its head's token.
        return Identity(is_master=False, token=record.get("superseded_by") or token, key=record, budget=budget)

    def _budget(self, token: str) -> tuple:
        try:
            return tuple(self.redis.hmget(self.names.key_spend(token), "budget_period", "budget_spend"))
        except REDIS_ERRORS:
            raise unavailable() from None

    def _changed(self, *tokens: str) -> None:
        """After an admin write: no worker may keep serving the old record from its cache."""
        if self.cache is not None:
            self.cache.evict(tokens)
        # Every other worker, of this instance or another, evicts what is published here.
        try:
            for token in tokens:
                self.redis.publish(self.names.key_changes, token)
        except REDIS_ERRORS:  # their cache TTL still bounds staleness; the change itself is saved
            log.warning("key change not published; other workers see it within KEY_CACHE_TTL")

    def list(self, page: int, size: int, key_alias=None, user_id=None, team_id=None, full=False) -> dict:
        try:
            self.redis.zremrangebyscore(self.index, "-inf", time.time())
            tokens = self.redis.zrange(self.index, 0, -1)
            records = []
            for start in range(0, len(tokens), 500):
                batch = tokens[start:start + 500]
                raws = self.redis.mget([self.record_key(t) for t in batch])
                records += [json.loads(r) for r in raws if r]
        except REDIS_ERRORS:
            raise unavailable() from None
        now = time.time()
        records = [r for r in records
                   if (r.get("expires_at") is None or r["expires_at"] > now)
                   and (key_alias is None or r.get("key_alias") == key_alias)
                   and (user_id is None or r.get("user_id") == user_id)
                   and (team_id is None or r.get("team_id") == team_id)]
        records.sort(key=lambda r: (r["created_at"], r["token"]), reverse=True)
        total = len(records)
        chosen = records[(page - 1) * size: page * size]
        return {
            "keys": chosen if full else [r["token"] for r in chosen],
            "total_count": total,
            "current_page": page,
            "total_pages": (total + size - 1) // size,
        }

    # -- writing ----------------------------------------------------------------------------
    def _transaction(self, fn, *watched):
        try:
            return self.redis.transaction(fn, *watched, value_from_callable=True)
        except REDIS_ERRORS:
            raise unavailable() from None

    def _alias_taken(self, pipe, alias: str, token: str) -> bool:
        owner = pipe.get(self.alias_key(alias))
        return bool(owner) and owner != token and bool(pipe.exists(self.record_key(owner)))

    def _lineage(self, pipe, token: str) -> tuple[dict | None, list[dict]]:
        """(head, live superseded copies) of the logical key `token` belongs to.

        Runs before MULTI and WATCHes everything it reads, so a concurrent regenerate or expiry
        makes the transaction retry with the new head. The head's `previous_tokens` comes back
        pruned to the copies that still live.
        """
        pipe.watch(self.record_key(token))
        raw = pipe.get(self.record_key(token))
        if raw is None:
            return None, []
        head = json.loads(raw)
        if head.get("superseded_by"):
            pipe.watch(self.record_key(head["superseded_by"]))
            raw = pipe.get(self.record_key(head["superseded_by"]))
            if raw is None:  # the head is gone (deleted, expired): this copy stands alone
                return {k: v for k, v in head.items() if k not in _HEAD_ONLY}, []
            head = json.loads(raw)
        ends = head.get("previous_tokens") or {}
        copies = []
        if ends:
            names = [self.record_key(t) for t in ends]
            pipe.watch(*names)
            now = time.time()
            copies = [json.loads(r) for r in pipe.mget(names) if r]
            copies = [c for c in copies if ends[c["token"]] > now]
        head["previous_tokens"] = {c["token"]: ends[c["token"]] for c in copies}
        return head, copies

    def _write(self, pipe, record: dict):
        """Queue the writes for one head record (inside MULTI).

        Lifetimes are absolute (PXAT from `expires_at`), so Redis and the record agree on the
        instant a key dies, and rewriting a record never stretches its life.
        """
        token, alias = record["token"], record.get("key_alias")
        body = json.dumps(record, separators=(",", ":"))
        expires_at = record.get("expires_at")
        at_ms = int(expires_at * 1000) if expires_at is not None else None
        if at_ms:
            pipe.set(self.record_key(token), body, pxat=at_ms)
            pipe.set(self.gone_key(token), "expired", pxat=at_ms + GONE_RETENTION_MS)
        else:
            pipe.set(self.record_key(token), body)
            pipe.delete(self.gone_key(token))
        if alias:
            pipe.set(self.alias_key(alias), token, pxat=at_ms)
        pipe.zadd(self.index, {token: expires_at if expires_at is not None else "+inf"})

    def _write_copies(self, pipe, head: dict, copies: list[dict]) -> None:
        """Queue each live copy rewritten from the head: same settings, its own token, name and end.

        A copy never outlives the head (a shorter duration set on the head cuts its grace).
        The alias stays with the head.
        """
        ends = head.get("previous_tokens") or {}
        for old in copies:
            end = ends[old["token"]]
            if head.get("expires_at") is not None:
                end = min(end, head["expires_at"])
            copy = {k: v for k, v in head.items() if k not in _HEAD_ONLY}
            copy.update(token=old["token"], key_name=old["key_name"], status=SUPERSEDED,
                        superseded_by=head["token"], expires_at=end, expires=iso(end))
            at_ms = int(end * 1000)
            pipe.set(self.record_key(old["token"]), json.dumps(copy, separators=(",", ":")), pxat=at_ms)
            pipe.set(self.gone_key(old["token"]), "regenerated", pxat=at_ms + GONE_RETENTION_MS)
            pipe.zadd(self.index, {old["token"]: end})

    def _retire(self, pipe, token: str) -> None:
        """Queue: this old key stops now; for 30 days it hears "regenerated"."""
        pipe.delete(self.record_key(token))
        pipe.zrem(self.index, token)
        pipe.set(self.gone_key(token), "regenerated", px=GONE_RETENTION_MS)

    def _drop(self, pipe, token: str) -> None:
        """Queue: delete this key and everything stored about it."""
        pipe.delete(self.record_key(token), self.gone_key(token), self.names.key_spend(token))
        pipe.zrem(self.index, token)

    @staticmethod
    def _tokens(head: dict) -> list[str]:
        return [head["token"], *(head.get("previous_tokens") or {})]

    def generate(self, fields: dict, *, caller: str) -> dict:
        """Create a key from validated fields; returns the record plus the plaintext `key`."""
        custom = fields.pop("key", None)
        key = custom or new_key()
        token = hash_key(key)
        now = time.time()
        ttl = parse_duration(fields["duration"]) if fields.get("duration") else None
        record = {
            "token": token, "key_name": key_name(key),
            "key_alias": None, "duration": None, "models": [], "max_budget": None,
            "budget_duration": None, "metadata": {}, "user_id": None, "team_id": None,
            "rpm_limit": None, "tpm_limit": None, "max_parallel_requests": None,
            "allowed_routes": [], "blocked": False, "tags": [],
        }
        record.update(fields)
        record.update(created_at=iso(now), updated_at=iso(now), created_epoch=now,
                      expires_at=now + ttl if ttl else None, expires=iso(now + ttl) if ttl else None)
        alias = record.get("key_alias")

        def create(pipe):
            if pipe.exists(self.record_key(token)):
                raise GatewayError(400, "key: a key with this value already exists", param="key")
            if alias and self._alias_taken(pipe, alias, token):
                raise GatewayError(400, f"key_alias: {alias!r} is already used by another key", param="key_alias")
            pipe.multi()
            self._write(pipe, record)
            self.audit.add(pipe, "generate", caller, record, fields, custom_key=bool(custom))

        watched = [self.record_key(token)] + ([self.alias_key(alias)] if alias else [])
        self._transaction(create, *watched)
        return {**record, "key": key}

    def update(self, record: dict, changes: dict, *, caller: str, action: str = "update") -> dict:
        """Apply validated changes to the logical key `record` belongs to (its head and every
        live copy); a new duration restarts the lifetime, None removes it."""
        now = time.time()

        def apply(pipe):
            head, copies = self._lineage(pipe, record["token"])
            if head is None:
                raise GatewayError(404, "no such key (it may have expired or been deleted)", "not_found_error", param="key")
            token, old_alias = head["token"], head.get("key_alias")
            new_alias = changes.get("key_alias", old_alias)
            aliases = [self.alias_key(a) for a in {old_alias, new_alias} if a]
            if aliases:
                pipe.watch(*aliases)
            if new_alias and new_alias != old_alias and self._alias_taken(pipe, new_alias, token):
                raise GatewayError(400, f"key_alias: {new_alias!r} is already used by another key", param="key_alias")
            updated = {**head, **{k: v for k, v in changes.items() if k != "duration"}, "updated_at": iso(now)}
            if "duration" in changes:
                duration = changes["duration"]
                seconds = parse_duration(duration) if duration else None
                updated["duration"] = duration
                updated["expires_at"] = now + seconds if seconds else None
                updated["expires"] = iso(updated["expires_at"])
            pipe.multi()
            if old_alias and old_alias != new_alias:
                pipe.delete(self.alias_key(old_alias))
            self._write(pipe, updated)
            self._write_copies(pipe, updated, copies)
            self.audit.add(pipe, action, caller, updated, changes)
            return updated

        updated = self._transaction(apply, self.record_key(record["token"]))
        self._changed(*self._tokens(updated))
        return updated

    def delete(self, records: list[dict], *, caller: str) -> None:
        """Delete several keys at once (all or nothing), each with its live superseded copies."""
        def remove(pipe):
            heads = {}
            for r in records:
                head, _ = self._lineage(pipe, r["token"])
                if head is not None:
                    heads[head["token"]] = head
            aliases = [h["key_alias"] for h in heads.values() if h.get("key_alias")]
            if aliases:
                pipe.watch(*[self.alias_key(a) for a in aliases])
            owners = {a: pipe.get(self.alias_key(a)) for a in aliases}
            pipe.multi()
            for head in heads.values():
                for token in self._tokens(head):
                    self._drop(pipe, token)
                if head.get("key_alias") and owners.get(head["key_alias"]) == head["token"]:
                    pipe.delete(self.alias_key(head["key_alias"]))
                copies = {"previous_tokens": list(head["previous_tokens"])} if head["previous_tokens"] else {}
                self.audit.add(pipe, "delete", caller, head, **copies)
            return [t for head in heads.values() for t in self._tokens(head)]

        gone = self._transaction(remove, *[self.record_key(r["token"]) for r in records])
        self._changed(*{r["token"] for r in records}, *gone)

    def regenerate(self, record: dict, grace_seconds: int | None, custom_key: str | None = None,
                   *, caller: str) -> dict:
        """Issue a new key with the same settings. The old key, and any older copy still in its
        grace period, stops now, or at the latest after the new grace period."""
        key = custom_key or new_key()
        token = hash_key(key)
        now = time.time()

        def swap(pipe):
            head, copies = self._lineage(pipe, record["token"])
            if head is None:
                raise GatewayError(404, "no such key (it may have expired or been deleted)", "not_found_error", param="key")
            if pipe.exists(self.record_key(token)):
                raise GatewayError(400, "new_key: a key with this value already exists", param="new_key")
            old = head["token"]
            fresh = {**head, "token": token, "key_name": key_name(key), "updated_at": iso(now),
                     "regenerated_at": iso(now), "previous_tokens": {}}
            if grace_seconds:
                cutoff = now + grace_seconds
                ends = {t: min(end, cutoff) for t, end in head["previous_tokens"].items()}
                fresh["previous_tokens"] = {**ends, old: cutoff}
            pipe.multi()
            self._write(pipe, fresh)
            # Spend and budget carry over to the new key.
            pipe.copy(self.names.key_spend(old), self.names.key_spend(token), replace=True)
            survivors = [c for c in [*copies, head] if c["token"] in fresh["previous_tokens"]]
            self._write_copies(pipe, fresh, survivors)
            for c in [*copies, head]:
                if c["token"] not in fresh["previous_tokens"]:
                    self._retire(pipe, c["token"])
            self.audit.add(pipe, "regenerate", caller, fresh, {"grace_period": grace_seconds},
                           previous_token=old, custom_key=bool(custom_key))
            return fresh, [c["token"] for c in [*copies, head]]

        fresh, old_tokens = self._transaction(swap, self.record_key(record["token"]), self.record_key(token))
        self._changed(*old_tokens)
        return {**fresh, "key": key}
