"""Virtual keys in Redis: only sha256(key) is stored, lifetimes are Redis TTLs.

Layout under the prefix (default `vgw:`), every name of one key tagged `{token}` so that it
lives in one Redis Cluster slot (gateway/core/redisnames.py):
  key:{token}      JSON record of the key, PXAT = its expiry (none when it never expires)
  gone:{token}     why a key no longer works ("expired" / "regenerated"), kept 30 days longer,
                   so a caller hears "expired" rather than "invalid"; it holds no key material
  spend:{token}    its usage and budget-period spend, in integer nano-dollars
                   (gateway/usage/budgets.py)
and, in slots of their own, the alias and the listing indexes (gateway/keys/index.py).

A sharded keyspace has no transaction across keys, so each record is changed in a WATCH/MULTI
transaction on its own slot, and the indexes, aliases, carried-over spend and audit entry are
written around it in an order that never loses a key: see each write's docstring. A write
that finds a record changed under it starts again.

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
from gateway.core.redisconn import REDIS_ERRORS, incidents, unavailable
from gateway.core.timefmt import iso
from gateway.keys.cache import KeyCache, publish_changes
from gateway.keys.index import KeyIndex
from gateway.core.redisnames import RedisNames
from gateway.core.runtime import gevent_patched
from gateway.usage.budgets import BUDGET_FIELDS, budget_read

log = logging.getLogger("gateway")
GONE_RETENTION_MS = 30 * 86400 * 1000
SUPERSEDED = "superseded"
# Fields only the head carries; a superseded copy has its own token, name and lifetime.
_HEAD_ONLY = ("previous_tokens", "superseded_by", "status")
_TOKEN = re.compile(r"[0-9a-f]{64}")
# Regenerate: hand the old key's spend over to the new key. Runs on the old key's slot: marks
# the hash `moved_to` (accounting forwards charges that still arrive for the old token) and
# returns what it held, which the store adds to the new key's hash.
_CARRY_SPEND = """
local held = redis.call('HGETALL', KEYS[1])
redis.call('HSET', KEYS[1], 'moved_to', ARGV[1])
return held
"""


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
        self.keys = KeyIndex(client, names)
        self._carry = client.register_script(_CARRY_SPEND)
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
    def has_earlier_layout(self) -> bool:
        """Whether keys of the earlier layout (untagged names, one `keys` index) are still in
        Redis: this version cannot see them until `python -m gateway.keys.migrate` has run."""
        try:
            return bool(self.redis.exists(self.names.prefix + "keys"))
        except (redis.exceptions.RedisError, *REDIS_ERRORS):  # a start-up hint only: never fatal
            return False

    def build_alias_search(self, page: int = 1000) -> int:
        """Put keys made before the alias search index existed into it, once per deployment
        (the first worker to start does it; a marker tells the others). Returns keys added."""
        try:
            if (not self.redis.exists(self.names.keys_by_created)  # no keys: every new one is indexed
                    or not self.redis.set(self.names.keys_by_alias_built, "building", nx=True, ex=600)):
                return 0
            added, start = 0, 0
            while True:
                tokens = self.redis.zrange(self.names.keys_by_created, start, start + page - 1)
                if not tokens:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for record in self._records(tokens).values():
                    if record is not None and record.get("key_alias"):
                        self.keys.add(pipe, record)
                        added += 1
                pipe.execute()
                start += page
            self.redis.set(self.names.keys_by_alias_built, "1")
            return added
        except (redis.exceptions.RedisError, *REDIS_ERRORS) as exc:  # a start-up step only: never fatal
            incidents.report(exc, "Keys made before the alias search index existed are added to it at the "
                                  "next start.")  # one line per incident, like every Redis failure
            try:
                self.redis.delete(self.names.keys_by_alias_built)
            except (redis.exceptions.RedisError, *REDIS_ERRORS):
                pass
            return 0

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
            pipe.hmget(self.names.key_spend(token), BUDGET_FIELDS)
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
        record, budget = json.loads(raw), budget_read(budget)
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
            return budget_read(self.redis.hmget(self.names.key_spend(token), BUDGET_FIELDS))
        except REDIS_ERRORS:
            raise unavailable() from None

    def changed(self, *tokens: str) -> None:
        """After an admin write: no worker may keep serving the old record from its cache (also
        a team's entry, gateway/teams/store.py)."""
        if self.cache is not None:
            self.cache.evict(tokens)
        # Every other worker, of this instance or another, evicts what is published here.
        try:
            publish_changes(self.redis, self.names.key_changes, tokens)
        except REDIS_ERRORS:  # their cache TTL still bounds staleness; the change itself is saved
            log.warning("key change not published; other workers see it within KEY_CACHE_TTL")

    def list(self, page: int, size: int, key_alias=None, user_id=None, team_id=None, full=False,
             search=None) -> dict:
        """A page of keys, newest first, read through an index: one page of records per call,
        whatever the number of keys (filters use the alias, user or team index; `search`, an
        alias prefix, lists in alphabetical order)."""
        start = (page - 1) * size
        if search is not None:
            return self._search(search, page, size, full)
        try:
            self.keys.prune_expired(time.time())
            if key_alias is not None:
                # The alias's owner and the copies it was regenerated from (they carry it too).
                owner = self.keys.alias_owner(key_alias)
                head = self.get(owner) if owner else None
                total, tokens, index = 0, self._tokens(head) if head else [], None
            else:
                index = (self.names.keys_by_user(user_id) if user_id is not None
                         else self.names.keys_by_team(team_id) if team_id is not None
                         else self.names.keys_by_created)
                total, tokens = self.keys.page(index, start, start + size - 1)
            records = self._records(tokens)
        except REDIS_ERRORS:
            raise unavailable() from None
        now = time.time()
        live = {t: r for t, r in records.items()
                if r is not None and (r.get("expires_at") is None or r["expires_at"] > now)
                and (user_id is None or r.get("user_id") == user_id)
                and (team_id is None or r.get("team_id") == team_id)}
        if index is not None and len(live) < len(tokens):
            try:  # entries of keys that are gone (or left this user/team): dropped as they are met
                self.keys.forget(index, [t for t in tokens if t not in live])
            except REDIS_ERRORS:
                pass
        chosen = [live[t] for t in tokens if t in live]
        if key_alias is not None:
            chosen = [r for r in chosen if r.get("key_alias") == key_alias]
            total, chosen = len(chosen), chosen[start:start + size]
        return {
            "keys": chosen if full else [r["token"] for r in chosen],
            "total_count": total,
            "current_page": page,
            "total_pages": (total + size - 1) // size,
        }

    def _search(self, prefix: str, page: int, size: int, full: bool) -> dict:
        """Keys whose alias starts with `prefix` (any case). An entry whose key is gone, or whose
        alias changed, is dropped as it is met (so a page may come out short once)."""
        try:
            total, entries = self.keys.search_alias(prefix, (page - 1) * size, size)
            records = self._records([token for _, token in entries])
        except REDIS_ERRORS:
            raise unavailable() from None
        now = time.time()
        chosen, stale = [], []
        for entry, token in entries:
            record = records.get(token)
            if (record is None or (record.get("expires_at") or float("inf")) <= now
                    or (record.get("key_alias") or "").lower() != entry.rpartition("\0")[0]):
                stale.append(entry)
            else:
                chosen.append(record)
        try:
            self.keys.forget_alias_entries(stale)
        except REDIS_ERRORS:
            pass
        return {"keys": chosen if full else [r["token"] for r in chosen], "total_count": total,
                "current_page": page, "total_pages": (total + size - 1) // size}

    def records(self, tokens: list[str]) -> dict[str, dict | None]:
        """The records of `tokens` (None for a key that is gone), in one round trip."""
        try:
            return self._records(tokens)
        except REDIS_ERRORS:
            raise unavailable() from None

    def current_tokens(self, tokens: list[str], hops: int = 3) -> dict[str, str]:
        """token -> the token of the key it now is: itself, or, for a regenerated key's old
        token, its successor's (followed through up to `hops` regenerations), as far as Redis
        still knows (the old copy's record, else its spend's `moved_to`)."""
        current = {token: token for token in tokens}
        try:
            for _ in range(hops):
                heads = set(current.values())
                records = self._records(sorted(heads))
                gone = [t for t in sorted(heads) if records.get(t) is None]
                pipe = self.redis.pipeline(transaction=False)
                for token in gone:
                    pipe.hget(self.names.key_spend(token), "moved_to")
                moved = dict(zip(gone, pipe.execute() if gone else []))
                step = {t: (records[t] or {}).get("superseded_by") or moved.get(t) or t for t in heads}
                if all(step[t] == t for t in heads):
                    break
                current = {token: step[head] for token, head in current.items()}
        except REDIS_ERRORS:
            raise unavailable() from None
        return current

    def _records(self, tokens: list[str]) -> dict[str, dict | None]:
        if not tokens:
            return {}
        pipe = self.redis.pipeline(transaction=False)  # one slot each: fine on a cluster
        for token in tokens:
            pipe.get(self.record_key(token))
        return {t: json.loads(raw) if raw else None for t, raw in zip(tokens, pipe.execute())}

    # -- writing ----------------------------------------------------------------------------
    # Every write below changes one record at a time, each in a WATCH/MULTI transaction on the
    # record's own slot; the indexes and aliases follow the order gateway/keys/index.py
    # describes. Redis errors become a 503 (the change may be partly done; repeating it is safe).
    def _transaction(self, fn, *watched):
        return self.redis.transaction(fn, *watched, value_from_callable=True)

    def _exists(self, token: str) -> bool:
        return bool(self.redis.exists(self.record_key(token)))

    def _claim_alias(self, alias: str, token: str, expires_at) -> None:
        if self.keys.claim_alias(alias, token, expires_at, self._exists):
            raise GatewayError(400, f"key_alias: {alias!r} is already used by another key", param="key_alias")

    def _queue_record(self, pipe, record: dict, gone: str = "expired") -> None:
        """Queue the record and its gone marker (inside MULTI).

        Lifetimes are absolute (PXAT from `expires_at`), so Redis and the record agree on the
        instant a key dies, and rewriting a record never stretches its life.
        """
        token = record["token"]
        body = json.dumps(record, separators=(",", ":"))
        expires_at = record.get("expires_at")
        if expires_at is not None:
            at_ms = int(expires_at * 1000)
            pipe.set(self.record_key(token), body, pxat=at_ms)
            pipe.set(self.gone_key(token), gone, pxat=at_ms + GONE_RETENTION_MS)
        else:
            pipe.set(self.record_key(token), body)
            pipe.delete(self.gone_key(token))

    def _index(self, record: dict, before: dict | None = None) -> None:
        """List `record` (and unlist the user, team or alias it no longer has)."""
        pipe = self.redis.pipeline(transaction=False)
        owners = ("user_id", "team_id", "key_alias")
        if before is not None and [before.get(f) for f in owners] != [record.get(f) for f in owners]:
            self.keys.remove_owners(pipe, before)
        self.keys.add(pipe, record)
        pipe.execute()

    def _unindex(self, records: list[dict]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            self.keys.remove(pipe, record)
        pipe.execute()

    def _head_of(self, token: str) -> tuple[dict | None, list[dict]]:
        """(head, live superseded copies) of the logical key `token` belongs to; the head's
        `previous_tokens` comes back pruned to the copies that still live."""
        record = self.get(token)
        if record is None:
            return None, []
        if record.get("superseded_by"):
            head = self.get(record["superseded_by"])
            if head is None:  # the head is gone (deleted, expired): this copy stands alone
                return {k: v for k, v in record.items() if k not in _HEAD_ONLY}, []
            record = head
        ends = record.get("previous_tokens") or {}
        now = time.time()
        copies = [c for c in self._records(list(ends)).values() if c is not None and ends[c["token"]] > now]
        record["previous_tokens"] = {c["token"]: ends[c["token"]] for c in copies}
        return record, copies

    def _rewrite(self, token: str, build, expected: dict | None = None):
        """Rewrite one record with `build(current) -> (new record, result)` in a transaction on
        its slot; `expected` (the record the caller decided on) must still be what is stored,
        else Retry: a concurrent admin write got there first."""
        def apply(pipe):
            raw = pipe.get(self.record_key(token))
            current = json.loads(raw) if raw else None
            if expected is not None and _settings(current) != _settings(expected):
                raise _Retry()
            new, result = build(current)
            pipe.multi()
            if new is not None:
                self._queue_record(pipe, new, "regenerated" if new.get("superseded_by") else "expired")
            return result
        return self._transaction(apply, self.record_key(token))

    def _copy_of(self, head: dict, old: dict, end: float) -> dict:
        """A live superseded copy rewritten from the head: same settings, its own token, name
        and end. A copy never outlives the head; the alias stays with the head."""
        if head.get("expires_at") is not None:
            end = min(end, head["expires_at"])
        copy = {k: v for k, v in head.items() if k not in _HEAD_ONLY}
        copy.update(token=old["token"], key_name=old["key_name"], status=SUPERSEDED,
                    superseded_by=head["token"], expires_at=end, expires=iso(end))
        return copy

    def _write_copies(self, head: dict, copies: list[dict]) -> None:
        ends = head.get("previous_tokens") or {}
        for old in copies:
            copy = self._copy_of(head, old, ends[old["token"]])
            self._rewrite(old["token"], lambda current, copy=copy: (copy if current else None, None))
            self._index(copy, old)

    def _retire(self, tokens: list[str]) -> None:
        """These old keys stop now; for 30 days they hear "regenerated"."""
        pipe = self.redis.pipeline(transaction=False)
        for token in tokens:
            pipe.delete(self.record_key(token))
            pipe.set(self.gone_key(token), "regenerated", px=GONE_RETENTION_MS)
        pipe.execute()

    def _drop(self, tokens: list[str]) -> None:
        """Delete these keys and everything stored about them (one slot each)."""
        pipe = self.redis.pipeline(transaction=False)
        for token in tokens:
            for name in (self.record_key(token), self.gone_key(token), self.names.key_spend(token),
                         self.names.budget_holds(token), self.names.budget_settled(token)):
                pipe.delete(name)  # one by one: a cluster pipeline refuses multi-key DEL
        pipe.execute()

    def _carry_spend(self, old: str, new: str) -> None:
        """The new key starts with the old key's spend (a copy across slots, not COPY)."""
        held = self._carry(keys=[self.names.key_spend(old)], args=[new])
        fields = dict(zip(held[::2], held[1::2])) if isinstance(held, list) else dict(held or {})
        fields.pop("moved_to", None)
        if fields:
            self.redis.hset(self.names.key_spend(new), mapping=fields)

    @staticmethod
    def _tokens(head: dict) -> list[str]:
        return [head["token"], *(head.get("previous_tokens") or {})]

    def _retrying(self, fn):
        """Run an admin write, again when a concurrent one changed a record under it."""
        for _ in range(20):
            try:
                return fn()
            except _Retry:
                continue
            except REDIS_ERRORS:
                raise unavailable() from None
        raise GatewayError(409, "the key kept changing under this request; retry", "conflict")

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

        def create():
            if self._exists(token):
                raise GatewayError(400, "key: a key with this value already exists", param="key")
            if alias:
                self._claim_alias(alias, token, record["expires_at"])
            self._index(record)

            def build(current):
                if current is not None:
                    raise GatewayError(400, "key: a key with this value already exists", param="key")
                return record, None
            try:
                self._rewrite(token, build)
            except GatewayError:
                if alias:
                    self.keys.release_alias(alias, token)
                raise
            self.audit.add(self.redis, "generate", caller, record, fields, custom_key=bool(custom))

        self._retrying(create)
        return {**record, "key": key}

    def update(self, record: dict, changes: dict, *, caller: str, action: str = "update") -> dict:
        """Apply validated changes to the logical key `record` belongs to (its head and every
        live copy); a new duration restarts the lifetime, None removes it."""
        def apply():
            head, copies = self._head_of(record["token"])
            if head is None:
                raise GatewayError(404, "no such key (it may have expired or been deleted)", "not_found_error", param="key")
            now = time.time()
            old_alias = head.get("key_alias")
            new_alias = changes.get("key_alias", old_alias)
            updated = {**head, **{k: v for k, v in changes.items() if k != "duration"}, "updated_at": iso(now)}
            if "duration" in changes:
                duration = changes["duration"]
                seconds = parse_duration(duration) if duration else None
                updated["duration"] = duration
                updated["expires_at"] = now + seconds if seconds else None
                updated["expires"] = iso(updated["expires_at"])
            if new_alias:
                self._claim_alias(new_alias, head["token"], updated["expires_at"])
            self._index(updated, head)
            try:
                self._rewrite(head["token"], lambda current: (updated, None), expected=head)
            except _Retry:
                if new_alias and new_alias != old_alias:
                    self.keys.release_alias(new_alias, head["token"])
                raise
            if old_alias and old_alias != new_alias:
                self.keys.release_alias(old_alias, head["token"])
            self._write_copies(updated, copies)
            self.audit.add(self.redis, action, caller, updated, changes)
            return updated

        updated = self._retrying(apply)
        self.changed(*self._tokens(updated))
        return updated

    def delete(self, records: list[dict], *, caller: str) -> None:
        """Delete keys, each with its live superseded copies. Each key goes at once (its
        record and copies first, then its alias and index entries); a Redis error midway
        leaves the rest, and repeating the call finishes it."""
        def remove():
            heads = {}
            for r in records:
                head, copies = self._head_of(r["token"])
                if head is not None:
                    heads[head["token"]] = (head, copies)
            gone = []
            for head, copies in heads.values():
                tokens = self._tokens(head)
                self._drop(tokens)
                if head.get("key_alias"):
                    self.keys.release_alias(head["key_alias"], head["token"])
                self._unindex([head, *copies])
                extra = {"previous_tokens": list(head["previous_tokens"])} if head.get("previous_tokens") else {}
                self.audit.add(self.redis, "delete", caller, head, **extra)
                gone += tokens
            return gone

        gone = self._retrying(remove)
        self.changed(*{r["token"] for r in records}, *gone)

    def regenerate(self, record: dict, grace_seconds: int | None, custom_key: str | None = None,
                   *, caller: str) -> dict:
        """Issue a new key with the same settings. The old key, and any older copy still in its
        grace period, stops now, or at the latest after the new grace period.

        Order: the new key is written (with the old key's spend carried over) before anything of
        the old one changes, so a failure midway leaves the old key working and no spend lost."""
        key = custom_key or new_key()
        token = hash_key(key)

        def swap():
            head, copies = self._head_of(record["token"])
            if head is None:
                raise GatewayError(404, "no such key (it may have expired or been deleted)", "not_found_error", param="key")
            if self._exists(token):
                raise GatewayError(400, "new_key: a key with this value already exists", param="new_key")
            now = time.time()
            old = head["token"]
            fresh = {**head, "token": token, "key_name": key_name(key), "updated_at": iso(now),
                     "regenerated_at": iso(now), "previous_tokens": {}}
            if grace_seconds:
                cutoff = now + grace_seconds
                ends = {t: min(end, cutoff) for t, end in head["previous_tokens"].items()}
                fresh["previous_tokens"] = {**ends, old: cutoff}
            self._index(fresh)

            def build(current):
                if current is not None:
                    raise GatewayError(400, "new_key: a key with this value already exists", param="new_key")
                return fresh, None
            self._rewrite(token, build)
            self._carry_spend(old, token)
            if head.get("key_alias"):  # the alias moves to the new key (it was old's: a takeover)
                self.keys.claim_alias(head["key_alias"], token, fresh["expires_at"], lambda owner: owner != old)
            everyone = [*copies, head]
            survivors = [c for c in everyone if c["token"] in fresh["previous_tokens"]]
            retired = [c for c in everyone if c["token"] not in fresh["previous_tokens"]]
            self._write_copies(fresh, survivors)
            self._retire([c["token"] for c in retired])
            self._unindex(retired)
            self.audit.add(self.redis, "regenerate", caller, fresh, {"grace_period": grace_seconds},
                           previous_token=old, custom_key=bool(custom_key))
            return fresh, [c["token"] for c in everyone]

        fresh, old_tokens = self._retrying(swap)
        self.changed(*old_tokens)
        return {**fresh, "key": key}


def _settings(record: dict | None) -> dict:
    """A record as admin writes compare it: all of it but the pruned list of live copies.
    (`updated_at` alone has one-second resolution: two updates within a second looked alike.)"""
    return {k: v for k, v in (record or {}).items() if k != "previous_tokens"}


class _Retry(Exception):
    """A record changed between reading and writing it: start the admin write again."""
