"""Every Redis key name the gateway uses, in one place.

Per-key counters put the token in a hash tag (`{token}`) so a multi-key script on one
virtual key stays in one Redis Cluster slot.
"""
from __future__ import annotations


class RedisNames:
    def __init__(self, prefix: str = "vgw:"):
        self.prefix = prefix
        self.key_index = prefix + "keys"
        self.spend_log = prefix + "spendlog"
        self.key_changes = prefix + "key-changes"  # pub/sub channel: tokens whose record changed
        self.audit_log = prefix + "audit"  # stream of admin changes (gateway/keys/audit.py)

    def record(self, token: str) -> str:
        return f"{self.prefix}key:{token}"

    def alias(self, alias: str) -> str:
        return f"{self.prefix}alias:{alias}"

    def gone(self, token: str) -> str:
        return f"{self.prefix}gone:{token}"

    def key_spend(self, token: str) -> str:
        return f"{self.prefix}spend:{{{token}}}"

    def end_user_stats(self, bucket: str, end_user: str) -> str:
        """One key's ("master" for the master key) usage by one end user."""
        return f"{self.prefix}eu:{{{bucket}}}:{end_user}"

    def end_user_keys(self, end_user: str) -> str:
        """Which keys an end user's stats exist under (sorted set: bucket -> last request)."""
        return f"{self.prefix}eu-keys:{end_user}"

    def rpm(self, token: str, window: int) -> str:
        return f"{self.prefix}rl:{{{token}}}:rpm:{window}"

    def tpm(self, token: str, window: int) -> str:
        return f"{self.prefix}rl:{{{token}}}:tpm:{window}"

    def sticky(self, response_id: str) -> str:
        return f"{self.prefix}resp:{response_id}"

    def parallel(self, token: str) -> str:
        return f"{self.prefix}rl:{{{token}}}:parallel"
