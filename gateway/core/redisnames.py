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

    def record(self, token: str) -> str:
        return f"{self.prefix}key:{token}"

    def alias(self, alias: str) -> str:
        return f"{self.prefix}alias:{alias}"

    def gone(self, token: str) -> str:
        return f"{self.prefix}gone:{token}"

    def key_spend(self, token: str) -> str:
        return f"{self.prefix}spend:{{{token}}}"

    def end_user(self, end_user: str) -> str:
        return f"{self.prefix}enduser:{end_user}"

    def rpm(self, token: str, window: int) -> str:
        return f"{self.prefix}rl:{{{token}}}:rpm:{window}"

    def tpm(self, token: str, window: int) -> str:
        return f"{self.prefix}rl:{{{token}}}:tpm:{window}"

    def sticky(self, response_id: str) -> str:
        return f"{self.prefix}resp:{response_id}"

    def parallel(self, token: str) -> str:
        return f"{self.prefix}rl:{{{token}}}:parallel"
