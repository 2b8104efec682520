"""Every Redis key name the gateway uses, in one place.

Everything one request touches for one virtual key carries the key's token as a hash tag
(`{token}`): its record, gone marker, spend, budget reservations, rate-limit windows, leases and its own
spend log.
In a Redis Cluster they all live in one slot, so a request's reads and scripts never cross slots
and keys spread over every master. Names without a tag are single keys (indexes, the global
spend log, usage buckets): nothing reads or writes them in the same command as another key.
`gateway/keys/migrate.py` moves a keyspace of the earlier layout (untagged record and gone
marker) to this one.
"""
from __future__ import annotations


class RedisNames:
    def __init__(self, prefix: str = "vgw:"):
        self.prefix = prefix
        self.spend_log = prefix + "spendlog"
        self.key_changes = prefix + "key-changes"  # (sharded) pub/sub channel: tokens whose record changed
        self.audit_log = prefix + "audit"  # stream of admin changes (gateway/keys/audit.py)
        # Key indexes (gateway/keys/index.py): sorted sets of tokens.
        self.keys_by_created = prefix + "keys:created"  # token -> created epoch (the listing order)
        self.keys_by_expiry = prefix + "keys:expiry"  # token -> expiry epoch (+inf: never), for pruning
        self.keys_by_alias = prefix + "keys:alias"  # "<alias, lower case>\0<token>", for search by prefix
        self.keys_by_alias_built = prefix + "keys:alias:built"  # set once keys made before it are in it

    # -- one virtual key: one hash slot ----------------------------------------------------
    def record(self, token: str) -> str:
        return f"{self.prefix}key:{{{token}}}"

    def gone(self, token: str) -> str:
        return f"{self.prefix}gone:{{{token}}}"

    def key_spend(self, token: str) -> str:
        return f"{self.prefix}spend:{{{token}}}"

    def budget_holds(self, token: str) -> str:
        """Live budget reservations of one key (gateway/usage/budgets.py)."""
        return f"{self.prefix}hold:{{{token}}}"

    def budget_settled(self, token: str) -> str:
        """Per worker, the last accounting batch applied to this key (charges are applied once)."""
        return f"{self.prefix}settled:{{{token}}}"

    def key_log(self, token: str) -> str:
        """The spend-log entries of one key (a capped stream beside the global one)."""
        return f"{self.prefix}log:{{{token}}}"

    def rpm(self, token: str, window: int) -> str:
        return f"{self.prefix}rl:{{{token}}}:rpm:{window}"

    def tpm(self, token: str, window: int) -> str:
        return f"{self.prefix}rl:{{{token}}}:tpm:{window}"

    def parallel(self, token: str) -> str:
        return f"{self.prefix}rl:{{{token}}}:parallel"

    # -- per-model limits of one key (gateway/usage/modellimits.py): in the key's slot ----------
    def model_limit(self, token: str, model: str, what: str, window: int) -> str:
        """One model's rpm/tpm window or budget-period spend (`what`) for one key; the model is
        named by a digest (its name comes from the key's settings and may hold any character)."""
        import hashlib

        digest = hashlib.blake2b(model.encode(), digest_size=8).hexdigest()
        return f"{self.prefix}ml:{{{token}}}:{digest}:{what}:{window}"

    # -- key indexes -------------------------------------------------------------------------
    def alias(self, alias: str) -> str:
        return f"{self.prefix}alias:{alias}"

    def keys_by_user(self, user_id: str) -> str:
        return f"{self.prefix}keys:user:{user_id}"

    def keys_by_team(self, team_id: str) -> str:
        return f"{self.prefix}keys:team:{team_id}"

    # -- teams (gateway/teams/store.py) ---------------------------------------------------------
    # A team's spend, budget reservations and rate-limit windows are named by the helpers above
    # with the subject `team:<id>` (hash tag {team:<id>}, one slot per team), so the budget and
    # limit scripts run unchanged on them. Key tokens are hex: no subject collides with a key.
    @staticmethod
    def team_subject(team_id: str) -> str:
        return f"team:{team_id}"

    def team_record(self, team_id: str) -> str:
        """A team's JSON record, in its subject's slot."""
        return f"{self.prefix}team:{{team:{team_id}}}"

    def teams_by_created(self) -> str:
        """Every team id, scored by its creation epoch (the /team/list order)."""
        return f"{self.prefix}teams:created"

    # -- end users -----------------------------------------------------------------------------
    def end_user_stats(self, bucket: str, end_user: str) -> str:
        """One key's ("master" for the master key) usage by one end user."""
        return f"{self.prefix}eu:{{{bucket}}}:{end_user}"

    def end_user_keys(self, end_user: str) -> str:
        """Which keys an end user's stats exist under (sorted set: bucket -> last request)."""
        return f"{self.prefix}eu-keys:{end_user}"

    def end_user_log(self, end_user: str) -> str:
        """The spend-log entries of one end user (a capped list, newest first)."""
        return f"{self.prefix}eu-log:{end_user}"

    # -- usage over time and single requests ---------------------------------------------------
    def usage_bucket(self, interval: str, start: int) -> str:
        """Counters of one hour or day (interval "hour"/"day", start epoch), by key, model, end user."""
        return f"{self.prefix}usage:{interval}:{start}"

    def request_list(self, n: int) -> str:
        """One of the lists that find spend-log entries by request id (the id hashes to n)."""
        return f"{self.prefix}req:#{n}"

    def sticky(self, response_id: str) -> str:
        return f"{self.prefix}resp:{response_id}"

    # -- load-aware routing (gateway/relay/loadpoller.py) ---------------------------------------
    def poller_lease(self, instance_id: str) -> str:
        """Which worker of a gateway instance reads vLLM's /metrics (a lease of 3 poll intervals)."""
        return f"{self.prefix}poller:{instance_id}"

    def replica_load(self, replica: str) -> str:
        """One replica's shared load figures (a hash), named by a digest of its base URL."""
        return f"{self.prefix}load:{_replica_digest(replica)}"

    # -- token reconciliation (gateway/relay/reconcile.py) ----------------------------------------
    # The window's script reads and writes both hashes of a replica: one hash tag, one slot.
    def reconcile_window(self, replica: str) -> str:
        """One replica's open window (a hash): the gateway's tallies, vLLM's counters."""
        return f"{self.prefix}recon:{{{_replica_digest(replica)}}}"

    def reconcile_last(self, replica: str) -> str:
        """One replica's last closed window (a hash): both totals, when, and whether it is void."""
        return f"{self.prefix}recon:{{{_replica_digest(replica)}}}:last"


def _replica_digest(replica: str) -> str:
    """16 hex digits naming a replica's base URL (which may be long; never a credential)."""
    import hashlib

    return hashlib.blake2b(replica.encode(), digest_size=8).hexdigest()
