"""Virtual keys in Redis: only sha256(key) is stored, lifetimes are Redis TTLs.

Layout under the prefix (default `vgw:`):
  key:<token>      JSON record of the key, PX = remaining lifetime (none when it never expires)
  alias:<alias>    token owning the alias, same lifetime as the key
  gone:<token>     why a key no longer works ("expired" / "regenerated"), kept 30 days longer,
                   so a caller hears "expired" rather than "invalid"; it holds no key material
  keys             sorted set token -> expiry epoch (inf = never), for listing without KEYS
Multi-key changes run in WATCH/MULTI transactions, so no concurrent admin call loses a write.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import time

import redis

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
_TOKEN = re.compile(r"[0-9a-f]{64}")


def key_name(key: str) -> str:
    return f"sk-...{key[-4:]}"


def new_key() -> str:
    # 32 random bytes = 256 bits, above the 128 the product promises.
    return "sk-" + secrets.token_urlsafe(32)


class KeyStore:
    """CRUD and authentication for virtual keys."""

    def __init__(self, client: redis.Redis, names: RedisNames, cache_ttl: float = 0.9,
                 cache: bool | None = None):
        self.redis = client
        self.names = names
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
        return Identity(is_master=False, token=token, key=record, budget=budget)

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

    def _write(self, pipe, record: dict):
        """Queue the writes for one record (inside MULTI).

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

    def generate(self, fields: dict) -> dict:
        """Create a key from validated fields; returns the record plus the plaintext `key`."""
        key = fields.pop("key", None) or new_key()
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

        watched = [self.record_key(token)] + ([self.alias_key(alias)] if alias else [])
        self._transaction(create, *watched)
        return {**record, "key": key}

    def update(self, record: dict, changes: dict) -> dict:
        """Apply validated changes; a new duration restarts the lifetime, "-1" removes it."""
        token = record["token"]
        now = time.time()
        new_alias = changes.get("key_alias", record.get("key_alias"))
        old_alias = record.get("key_alias")

        def apply(pipe):
            current = pipe.get(self.record_key(token))
            if current is None:
                raise GatewayError(404, "no such key (it may have expired or been deleted)", "not_found_error", param="key")
            updated = json.loads(current)
            updated.update({k: v for k, v in changes.items() if k != "duration"})
            updated["updated_at"] = iso(now)
            if new_alias and new_alias != old_alias and self._alias_taken(pipe, new_alias, token):
                raise GatewayError(400, f"key_alias: {new_alias!r} is already used by another key", param="key_alias")
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
            return updated

        watched = [self.record_key(token)] + [self.alias_key(a) for a in {old_alias, new_alias} if a]
        updated = self._transaction(apply, *watched)
        self._changed(token)
        return updated

    def delete(self, records: list[dict]) -> None:
        """Delete several keys at once (all or nothing)."""
        def remove(pipe):
            owners = {r["key_alias"]: pipe.get(self.alias_key(r["key_alias"])) for r in records if r.get("key_alias")}
            pipe.multi()
            for r in records:
                pipe.delete(self.record_key(r["token"]), self.gone_key(r["token"]), self.names.key_spend(r["token"]))
                pipe.zrem(self.index, r["token"])
                if owners.get(r.get("key_alias")) == r["token"]:
                    pipe.delete(self.alias_key(r["key_alias"]))

        watched = [self.alias_key(r["key_alias"]) for r in records if r.get("key_alias")]
        self._transaction(remove, *watched)
        self._changed(*(r["token"] for r in records))

    def regenerate(self, record: dict, grace_seconds: int | None, custom_key: str | None = None) -> dict:
        """Issue a new key with the same settings; the old one stops now or after the grace period."""
        key = custom_key or new_key()
        token, old = hash_key(key), record["token"]
        now = time.time()

        def swap(pipe):
            current = pipe.get(self.record_key(old))
            if current is None:
                raise GatewayError(404, "no such key (it may have expired or been deleted)", "not_found_error", param="key")
            if pipe.exists(self.record_key(token)):
                raise GatewayError(400, "new_key: a key with this value already exists", param="new_key")
            fresh = json.loads(current)
            fresh.update(token=token, key_name=key_name(key), updated_at=iso(now), regenerated_at=iso(now))
            pipe.multi()
            self._write(pipe, fresh)
            # Spend and budget carry over to the new key.
            pipe.copy(self.names.key_spend(old), self.names.key_spend(token), replace=True)
            if grace_seconds:
                old_end = now + grace_seconds
                if fresh.get("expires_at") is not None:
                    old_end = min(old_end, fresh["expires_at"])
                pipe.pexpireat(self.record_key(old), int(old_end * 1000))
                pipe.zadd(self.index, {old: old_end})
                pipe.set(self.gone_key(old), "regenerated", pxat=int(old_end * 1000) + GONE_RETENTION_MS)
            else:
                pipe.delete(self.record_key(old))
                pipe.zrem(self.index, old)
                pipe.set(self.gone_key(old), "regenerated", px=GONE_RETENTION_MS)
            return fresh

        fresh = self._transaction(swap, self.record_key(old), self.record_key(token))
        self._changed(old)
        return {**fresh, "key": key}
