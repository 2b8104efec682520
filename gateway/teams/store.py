"""Teams in Redis: one JSON record per team, in the slot of the team's subject.

  team:{team:<id>}   the record (LiteLLM's team fields we support, created_at, created_epoch)
  teams:created      sorted set: team id -> created epoch, for /team/list
A team's spend, reservations and rate-limit windows live beside the record under the subject
`team:<id>` (gateway/core/redisnames.py), written by the budget and limit scripts.

Authentication reads a key's team through `lookup`, from the key cache (gateway/keys/cache.py,
entries `team:<id>` beside the keys' tokens): a team change evicts and publishes its entry
exactly as a key change does, so blocking a team, changing its limits or deleting it reaches
every worker of every instance in milliseconds, at worst within KEY_CACHE_TTL.
"""
from __future__ import annotations

import json
import time
import uuid

import redis

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.core.timefmt import iso


def cache_name(team_id: str) -> str:
    """A team's entry in the key cache (key tokens are hex digests: no clash)."""
    return "team:" + team_id


def not_found(team_id: str) -> GatewayError:
    return GatewayError(404, f"no such team_id {team_id!r}", "not_found_error", param="team_id")


class TeamStore:
    def __init__(self, client, names, audit=None, keystore=None):
        self.redis = client
        self.names = names
        self.audit = audit
        self.keystore = keystore  # its cache holds teams too, and its change channel evicts them

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
        """The team for a request: from the key cache when fresh, else Redis (a missing team is
        cached too, so a key naming a deleted team costs no round trip each time). Redis errors
        become 503 (a key's team limits must not be skipped: fail closed)."""
        cache = self.keystore.cache if self.keystore is not None else None
        hit = cache.get(cache_name(team_id)) if cache is not None else None
        if hit is not None:
            return hit[0]
        team = self.get(team_id)
        if cache is not None:
            cache.put(cache_name(team_id), team, (None, None))
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
                self._changed(team_id)
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
                self._changed(team_id)
                if team is not None:
                    self._audit("team_delete", caller, team, None)
        except REDIS_ERRORS:
            raise unavailable() from None

    def _changed(self, team_id: str) -> None:
        if self.keystore is not None:
            self.keystore.changed(cache_name(team_id))

    def _audit(self, action: str, caller: str, team: dict, changes: dict | None) -> None:
        if self.audit is not None:
            self.audit.add(self.redis, action, caller, {"token": None, "key_alias": None}, changes,
                           team_id=team["team_id"], team_alias=team.get("team_alias"))
