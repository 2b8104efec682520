"""Who is calling: the credential headers LiteLLM accepts, the master key, virtual keys."""
from __future__ import annotations

import dataclasses
import hashlib
import hmac

from gateway.core.errors import GatewayError


@dataclasses.dataclass
class Identity:
    """The authenticated caller. `key` is the virtual key's record (None for the master key)."""

    is_master: bool
    token: str | None = None
    key: dict | None = None
    budget: tuple = (None, None)  # (budget period id, spend in that period) as read from Redis
    team: dict | None = None  # the key's team record (gateway/teams/store.py), when it has one

    @property
    def label(self) -> str:
        """How the caller appears in logs: never the key itself."""
        if self.is_master:
            return "master"
        alias = (self.key or {}).get("key_alias")
        return f"key:{alias}" if alias else f"key:{self.token[:12]}"


def credential_from(environ) -> str | None:
    """The presented key; first match wins, in LiteLLM's order."""
    value = environ.get("HTTP_X_LITELLM_API_KEY")
    if value:
        return value.strip()
    value = environ.get("HTTP_AUTHORIZATION")
    if value:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in ("HTTP_API_KEY", "HTTP_X_API_KEY"):
        value = environ.get(name)
        if value:
            return value.strip()
    return None


def hash_key(key: str) -> str:
    """The token: sha256 hex of the key, the only form ever stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class Authenticator:
    """Checks the master key in constant time; virtual keys go to the keystore when there is one."""

    def __init__(self, master_key: str, keystore=None, teams=None):
        self._master_digest = hashlib.sha256(master_key.encode()).digest()
        self.keystore = keystore
        self.teams = teams  # gateway/teams/store.TeamStore: a key's team is read with the key

    def is_master(self, credential: str) -> bool:
        # Comparing digests keeps the time independent of the key's length and content.
        digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._master_digest)

    def authenticate(self, environ) -> Identity:
        credential = credential_from(environ)
        if not credential:
            raise GatewayError(401, "No API key given: send it as 'Authorization: Bearer <key>'", kind="missing_key")
        if self.is_master(credential):
            return Identity(is_master=True)
        if self.keystore is None:
            raise GatewayError(401, "Invalid API key", kind="invalid_key")
        return self.with_team(self.keystore.authenticate(credential))

    def with_team(self, identity: Identity) -> Identity:
        """Attach the key's team; a blocked team blocks its keys (401, as a blocked key). A key
        naming a team that does not exist (deleted, or a label set before teams existed) has no
        team limits, as before."""
        team_id = (identity.key or {}).get("team_id")
        if self.teams is None or not team_id:
            return identity
        team = self.teams.lookup(team_id)
        if team is not None and team.get("blocked"):
            raise GatewayError(401, "API key's team is blocked", "auth_error", kind="blocked_key")
        identity.team = team
        return identity

    def require_master(self, environ) -> Identity:
        """For admin routes: the master key, or 401/403."""
        identity = self.authenticate(environ)
        if not identity.is_master:
            raise GatewayError(403, "This route needs the master key; virtual keys cannot call it")
        return identity
