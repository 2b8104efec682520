"""Teams in Redis: one JSON record per team, in the slot of the team's subject.

  team:{team:<id>}   the record (LiteLLM's team fields we support, created_at, created_epoch)
  teams:created      sorted set: team id -> created epoch, for /team/list
A team's spend, reservations and rate-limit windows live beside the record under the subject
`team:<id>` (gateway/core/redisnames.py), written by the budget and limit scripts.

Authentication reads a key's team through `lookup`, cached per worker for `cache_ttl` (the key
cache's TTL, under a second): blocking a team, changing its limits or deleting it reaches every
worker of every instance within that time without a pub/sub channel of its own.
"""
from __future__ import annotations

import json
import time
import uuid

import redis

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.core.timefmt import iso

MAX_CACHED = 10_000
_MISSING = object()  # cached "no such team", so a key naming a deleted team costs no round trip each time


def not_found(team_id: str) -> GatewayError:
    return GatewayError(404, f"no such team_id {team_id!r}", "not_found_error", param="team_id")


class TeamStore:
    def __init__(self, client, names, audit=None, cache_ttl: float = 0.9):
        self.redis = client
        self.names = names
        self.audit = audit
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, object]] = {}

    # -- reading ------------------------------------------------------------------------------
    def get(self, team_id: str) -> dict | None:
        try:
            raw = self.redis.get(self.names.team_record(team_id))
        except REDIS_ERRORS:
            raise unavailable() from None
        return json.loads(raw) if raw else None

    def find(self, team_id: str) -> dict:
        team = self.get(team_id)
        if team is None:
            raise not_found(team_id)
        return team

    def require(self, team_id: str | None) -> None:
        """A key may name only an existing team (None: no team): 400 naming team_id otherwise."""
        if team_id is not None and self.get(team_id) is None:
            raise GatewayError(400, f"team_id: no team {team_id!r}; create it with /team/new first",
                               "bad_request_error", param="team_id")

    def lookup(self, team_id: str) -> dict | None:
        """The team for a request: from this worker's cache (at most cache_ttl old), else Redis.
        Redis errors become 503 (a key's team limits must not be skipped: fail closed)."""
        hit = self._cache.get(team_id)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return None if hit[1] is _MISSING else hit[1]
        team = self.get(team_id)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()  # bounded; entries live under a second anyway
        self._cache[team_id] = (now + self.cache_ttl, _MISSING if team is None else team)
        return team

    def list(self, page: int, size: int) -> dict:
        """Teams, newest first, one page of records per call."""
        start = (page - 1) * size
        try:
            index = self.names.teams_by_created()
            total = self.redis.zcard(index)
            ids = self.redis.zrevrange(index, start, start + size - 1)
            raws = [self.redis.get(self.names.team_record(i)) for i in ids]  # one slot each
        except REDIS_ERRORS:
            raise unavailable() from None
        teams = [json.loads(raw) for raw in raws if raw]
        return {"teams": teams, "total_count": total, "current_page": page,
                "total_pages": (total + size - 1) // size}

    # -- writing ------------------------------------------------------------------------------
    def create(self, team_id: str | None, fields: dict, *, caller: str) -> dict:
        """A new team; 400 when the id is taken."""
        team_id = team_id or str(uuid.uuid4())
        now = time.time()
        team = {"team_id": team_id, "team_alias": None, "models": [], "max_budget": None, "soft_budget": None,
                "budget_duration": None, "rpm_limit": None, "tpm_limit": None, "max_parallel_requests": None,
                "blocked": False, "metadata": {}, "tags": []}
        team.update(fields)
        team.update(created_at=iso(now), updated_at=iso(now), created_epoch=now)
        try:
            if not self.redis.set(self.names.team_record(team_id), json.dumps(team), nx=True):
                raise GatewayError(400, f"team_id: a team {team_id!r} already exists", param="team_id")
            self.redis.zadd(self.names.teams_by_created(), {team_id: now})
            self._audit("team_new", caller, team, fields)
        except REDIS_ERRORS:
            raise unavailable() from None
        return team

    def update(self, team_id: str, changes: dict, *, caller: str, action: str = "team_update") -> dict:
        """Apply validated changes in a WATCH/MULTI on the record (one key: fine on a Cluster)."""
        name = self.names.team_record(team_id)
        try:
            for _ in range(20):
                with self.redis.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(name)
                        raw = pipe.get(name)
                        if raw is None:
                            raise not_found(team_id)
                        team = {**json.loads(raw), **changes, "updated_at": iso(time.time())}
                        pipe.multi()
                        pipe.set(name, json.dumps(team))
                        pipe.execute()
                    except redis.WatchError:
                        continue
                self._cache.pop(team_id, None)
                self._audit(action, caller, team, changes)
                return team
        except REDIS_ERRORS:
            raise unavailable() from None
        raise GatewayError(409, "the team kept changing under this request; retry", "conflict")

    def delete(self, team_ids: list[str], key_counts: dict, *, caller: str) -> None:
        """Delete teams that have no keys; 409 naming the first that still has some (its keys
        would otherwise lose the team's budget and limits without anyone deciding so). All or
        nothing as far as the checks go: every id is checked before any is deleted."""
        for team_id in team_ids:
            self.find(team_id)
            if key_counts.get(team_id):
                raise GatewayError(409, f"team {team_id!r} still has {key_counts[team_id]} key(s): delete them or "
                                        "move them out (/key/update with team_id null) first", "conflict",
                                   param="team_ids")
        try:
            for team_id in team_ids:
                team = self.get(team_id)
                self.redis.delete(self.names.team_record(team_id))
                self.redis.zrem(self.names.teams_by_created(), team_id)
                self._cache.pop(team_id, None)
                if team is not None:
                    self._audit("team_delete", caller, team, None)
        except REDIS_ERRORS:
            raise unavailable() from None

    def _audit(self, action: str, caller: str, team: dict, changes: dict | None) -> None:
        if self.audit is not None:
            self.audit.add(self.redis, action, caller, {"token": None, "key_alias": None}, changes,
                           team_id=team["team_id"], team_alias=team.get("team_alias"))
