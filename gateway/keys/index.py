"""Finding keys without reading every record: the listing indexes and alias uniqueness.

A record lives in its token's hash slot; nothing here is written in the same transaction as a
record (on a Redis Cluster they are on different nodes). The order of writes makes the indexes
safe to use anyway:
- a key is added to the indexes *before* its record is written and removed *after* its record
  is gone, so an index may briefly name a key that does not exist (a reader skips it and drops
  the entry) but never misses one that does;
- an alias is claimed (atomically, in its own slot) before the record that carries it is
  written, and released only while it still points at the key releasing it.

Indexes (sorted sets of tokens):
  keys:created        created epoch: the listing order, newest first, paged with ZREVRANGE
  keys:expiry         expiry epoch (+inf: never): expired keys are pruned from every index
  keys:user:<id>      created epoch, for ?user_id= (likewise keys:team:<id> for ?team_id=)
  keys:alias          "<alias in lower case>\0<token>", all scored 0: search by alias prefix
                      (ZRANGEBYLEX), in alphabetical order
  alias:<alias>       the token owning the alias, expiring with the key (a string, not a set)
"""
from __future__ import annotations

# Claim an alias for ARGV[1] unless another key owns it; ARGV[3] names an owner the caller
# found dead (its record is gone), whose claim may be taken over. Returns the live owner, or nil.
_CLAIM_ALIAS = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] and owner ~= ARGV[3] then return owner end
if ARGV[2] == '' then redis.call('SET', KEYS[1], ARGV[1])
else redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2]) end
return false
"""
# Drop the alias only if it still points at ARGV[1].
_RELEASE_ALIAS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
PRUNE_BATCH = 1000
_LAST_CHAR = "\U0010ffff"  # sorts after every character: the end of a prefix's lexical range


def _alias_entry(record: dict) -> str | None:
    alias, token = record.get("key_alias"), record["token"]
    return f"{alias.lower()}\0{token}" if alias else None


def _at_ms(expires_at) -> str:
    return "" if expires_at is None else str(int(expires_at * 1000))


class KeyIndex:
    def __init__(self, client, names):
        self.redis = client
        self.names = names
        self._claim = client.register_script(_CLAIM_ALIAS)
        self._release = client.register_script(_RELEASE_ALIAS)

    # -- aliases ---------------------------------------------------------------------------
    def claim_alias(self, alias: str, token: str, expires_at, record_exists) -> str | None:
        """Make `token` the alias's owner (until expires_at); returns the other live owner
        instead when there is one. `record_exists(token)` tells a dead owner from a live one."""
        name = self.names.alias(alias)
        owner = self._claim(keys=[name], args=[token, _at_ms(expires_at), ""])
        if owner and not record_exists(owner):  # a leftover of a key that is gone: take it over
            owner = self._claim(keys=[name], args=[token, _at_ms(expires_at), owner])
        return owner or None

    def release_alias(self, alias: str, token: str) -> None:
        self._release(keys=[self.names.alias(alias)], args=[token])

    def alias_owner(self, alias: str) -> str | None:
        return self.redis.get(self.names.alias(alias))

    # -- listing indexes ---------------------------------------------------------------------
    def add(self, pipe, record: dict) -> None:
        """Queue: list this key (before its record is written)."""
        token, created = record["token"], record.get("created_epoch", 0)
        expires_at = record.get("expires_at")
        pipe.zadd(self.names.keys_by_created, {token: created})
        pipe.zadd(self.names.keys_by_expiry, {token: expires_at if expires_at is not None else "+inf"})
        if record.get("user_id"):
            pipe.zadd(self.names.keys_by_user(record["user_id"]), {token: created})
        if record.get("team_id"):
            pipe.zadd(self.names.keys_by_team(record["team_id"]), {token: created})
        if _alias_entry(record):
            pipe.zadd(self.names.keys_by_alias, {_alias_entry(record): 0})

    def remove(self, pipe, record: dict) -> None:
        """Queue: stop listing this key (after its record is gone), or only the
        user/team entries of a record whose user/team changed."""
        token = record["token"]
        pipe.zrem(self.names.keys_by_created, token)
        pipe.zrem(self.names.keys_by_expiry, token)
        self.remove_owners(pipe, record)

    def remove_owners(self, pipe, record: dict) -> None:
        """Queue: drop the record's user, team and alias entries."""
        if _alias_entry(record):
            pipe.zrem(self.names.keys_by_alias, _alias_entry(record))
        if record.get("user_id"):
            pipe.zrem(self.names.keys_by_user(record["user_id"]), record["token"])
        if record.get("team_id"):
            pipe.zrem(self.names.keys_by_team(record["team_id"]), record["token"])

    def prune_expired(self, now: float) -> None:
        """Drop keys whose lifetime ended from the main indexes (a user/team index drops
        them when a reader meets them)."""
        expired = self.redis.zrangebyscore(self.names.keys_by_expiry, "-inf", now, start=0, num=PRUNE_BATCH)
        if expired:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.names.keys_by_created, *expired)
            pipe.zrem(self.names.keys_by_expiry, *expired)
            pipe.execute()

    def page(self, index: str, start: int, stop: int) -> tuple[int, list[str]]:
        """(entries in the index, tokens start..stop newest first)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrevrange(index, start, stop)
        total, tokens = pipe.execute()
        return total, tokens

    def search_alias(self, prefix: str, start: int, size: int) -> tuple[int, list[tuple[str, str]]]:
        """(entries whose alias starts with `prefix`, ignoring case; (entry, token) for
        `size` of them from `start`, in alphabetical order)."""
        low, high = "[" + prefix.lower(), "[" + prefix.lower() + _LAST_CHAR
        pipe = self.redis.pipeline(transaction=False)
        pipe.zlexcount(self.names.keys_by_alias, low, high)
        pipe.zrangebylex(self.names.keys_by_alias, low, high, start=start, num=size)
        total, entries = pipe.execute()
        return total, [(entry, entry.rpartition("\0")[2]) for entry in entries]

    def forget_alias_entries(self, entries: list[str]) -> None:
        if entries:
            self.redis.zrem(self.names.keys_by_alias, *entries)

    def forget(self, index: str, tokens: list[str]) -> None:
        """Entries a reader found without a record (expired, or a write that never finished)."""
        if tokens:
            self.redis.zrem(index, *tokens)
