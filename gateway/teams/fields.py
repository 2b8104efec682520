"""Validation of the fields a team carries (LiteLLM's /team/new names); errors name the field (400).

The validators are the key fields' own (gateway/keys/fields.py), so a team's `max_budget` or
`rpm_limit` is read exactly as a key's. LiteLLM team fields this gateway does not implement are
refused by name with what to do instead, never silently dropped: a script that sets
`members_with_roles` must learn that nobody was made a member.
"""
from __future__ import annotations

import re

from gateway.core.errors import GatewayError
from gateway.keys.fields import KEY_FIELDS, require_object

# A team id becomes part of Redis key names inside a hash tag ({team:<id>}): no braces, no
# spaces; LiteLLM generates UUIDs, which fit.
TEAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")

TEAM_FIELDS = {
    "team_alias": KEY_FIELDS["key_alias"],
    "models": KEY_FIELDS["models"],
    "max_budget": KEY_FIELDS["max_budget"],
    "soft_budget": KEY_FIELDS["max_budget"],
    "budget_duration": KEY_FIELDS["budget_duration"],
    "rpm_limit": KEY_FIELDS["rpm_limit"],
    "tpm_limit": KEY_FIELDS["tpm_limit"],
    "max_parallel_requests": KEY_FIELDS["max_parallel_requests"],
    "blocked": KEY_FIELDS["blocked"],
    "metadata": KEY_FIELDS["metadata"],
    "tags": KEY_FIELDS["tags"],
}
TEAM_MONEY_FIELDS = ("max_budget", "soft_budget")

_MEMBERS = ("this gateway has no users or team members: give each member a key with /key/generate "
            "and this team_id (the key's user_id names its holder)")
# LiteLLM /team/new fields that are refused, with what to use instead.
UNSUPPORTED = {
    "members_with_roles": _MEMBERS,
    "members": _MEMBERS,
    "admins": _MEMBERS,
    "team_member_permissions": _MEMBERS,
    "team_member_budget": "per-member budgets are not supported: set max_budget on each member's key",
    "team_member_rpm_limit": "per-member limits are not supported: set rpm_limit on each member's key",
    "team_member_tpm_limit": "per-member limits are not supported: set tpm_limit on each member's key",
    "team_member_key_duration": "set duration on each key instead",
    "organization_id": "organizations are not supported",
    "model_aliases": "model aliases are not supported on teams",
    "model_rpm_limit": "per-model limits are set on keys, not teams",
    "model_tpm_limit": "per-model limits are set on keys, not teams",
    "model_max_budget": "per-model budgets are set on keys, not teams",
    "guardrails": "guardrails are not supported",
    "prompts": "prompts are not supported",
    "object_permission": "object permissions are not supported",
    "secret_manager_settings": "secret managers are not supported",
    "router_settings": "router settings are not supported per team",
    "allowed_passthrough_routes": "set allowed_routes on the team's keys",
    "allowed_vector_store_indexes": "vector stores are not supported",
}


def _bad(field: str, message: str) -> GatewayError:
    return GatewayError(400, f"{field}: {message}", "bad_request_error", param=field)


def team_id_field(value) -> str:
    """A valid team id, or 400 naming `team_id`."""
    if not isinstance(value, str) or not TEAM_ID.fullmatch(value):
        raise _bad("team_id", "must be 1 to 128 characters: letters, digits and . _ : @ - "
                              "(starting with a letter or digit)")
    return value


def validate_team(payload, allowed=TEAM_FIELDS) -> dict:
    """Check each given field (team_id apart); unsupported LiteLLM fields and unknown ones are
    refused by name."""
    fields = {}
    for name, value in require_object(payload).items():
        if name == "team_id":
            continue
        if name in UNSUPPORTED:
            raise _bad(name, f"not supported by this gateway: {UNSUPPORTED[name]}")
        if name not in allowed:
            raise _bad(name, f"unknown field; accepted fields are team_id, {', '.join(sorted(allowed))}")
        fields[name] = allowed[name](name, value)
    return fields
