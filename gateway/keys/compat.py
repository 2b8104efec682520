"""LiteLLM `/key/generate` and `/key/update` fields this gateway does not support, and what to use.

LiteLLM scripts and its SDK send many fields by habit, mostly at their defaults. An unknown field
is refused (a misspelt `rpm_limt` must not silently mean "no limit"), but a field LiteLLM
documents gets a message that says so and names this gateway's way to do it. Sent at its
"nothing" value (null, {}, [], false, 0, or `key_type: "default"`) such a field asks for nothing
and is accepted and dropped, so a script that sends `"config": {}` or `"send_invite_email": false`
keeps working. Checked against LiteLLM 1.95's GenerateKeyRequest / UpdateKeyRequest.
"""
from __future__ import annotations

from gateway.core.errors import GatewayError

# Field -> what to use instead. Each message completes "this gateway does not support <field>; ...".
UNSUPPORTED = {
    "spend": "spend is counted by the gateway from usage and cannot be set (GET /key/info shows it)",
    "agent_id": "there are no agents; label the key with metadata or tags",
    "project_id": "there are no projects; group keys with teams (team_id) or metadata",
    "organization_id": "there are no organizations; group keys with teams (team_id)",
    "budget_id": "there are no budget tiers; set max_budget, budget_duration, rpm_limit and tpm_limit "
                 "on the key, or on its team (team_id)",
    "budget_limits": "a key has one budget window: use max_budget with budget_duration, and "
                     "model_max_budget for per-model windows",
    "budget_fallbacks": "there are no fallbacks: a request over budget is refused (budget_exceeded); "
                        "point a model name at another model with aliases",
    "throttle_on_budget_exceeded": "a request over budget is always refused (400 budget_exceeded)",
    "temp_budget_increase": "raise max_budget with /key/update and lower it again later",
    "temp_budget_expiry": "raise max_budget with /key/update and lower it again later",
    "permissions": "restrict what a key may call with allowed_routes",
    "object_permission": "restrict a key with models and allowed_routes (there are no MCP servers, "
                         "agents or vector stores)",
    "access_group_ids": "there are no access groups; list the models in models, or use teams (team_id)",
    "allowed_passthrough_routes": "every /vllm route is a pass-through here: use allowed_routes",
    "allowed_cache_controls": "there is no response cache (vLLM's prefix cache needs no control)",
    "allowed_vector_store_indexes": "there are no vector stores",
    "mcp_rpm_limit": "there are no MCP servers; use rpm_limit or model_rpm_limit",
    "tag_rpm_limit": "use rpm_limit or model_rpm_limit",
    "rpm_limit_type": "limits are always hard one-minute windows; use rpm_limit",
    "tpm_limit_type": "limits are always hard one-minute windows; use tpm_limit",
    "guardrails": "there are no guardrails: vLLM receives the body as sent",
    "policies": "there are no guardrail policies: vLLM receives the body as sent",
    "disable_global_guardrails": "there are no guardrails",
    "prompts": "there is no prompt management: send the prompt in the request",
    "enforced_params": "request bodies are never rewritten (only a model name, by aliases); set limits "
                       "in vLLM itself (e.g. --max-model-len, --generation-config)",
    "config": "per-key LiteLLM config does not apply: requests reach vLLM untranslated",
    "router_settings": "the operator configures the vLLM replicas and routing for every key",
    "key_type": "what a key may call is set with allowed_routes",
    "send_invite_email": "there are no users or e-mail: the key is in this response only",
    "auto_rotate": "rotate a key with /key/regenerate (grace_period keeps the old one working a while)",
    "rotation_interval": "rotate a key with /key/regenerate (grace_period keeps the old one working a while)",
}

# Values that ask for nothing (LiteLLM's defaults). `0 == False`, so 0 and 0.0 count as well.
_NOTHING = (None, {}, [], False)


def asks_nothing(name: str, value) -> bool:
    """Whether an unsupported field is sent at a value that changes nothing (accepted, dropped)."""
    return value in _NOTHING or (name == "key_type" and value == "default")


def without_unsupported(payload: dict) -> dict:
    """The payload minus unsupported fields sent at a nothing value; 400 naming the first
    unsupported field that asks for something."""
    kept = {}
    for name, value in payload.items():
        if name not in UNSUPPORTED:
            kept[name] = value
        elif not asks_nothing(name, value):
            raise GatewayError(400, f"{name}: this gateway does not support {name}; {UNSUPPORTED[name]}",
                               "bad_request_error", param=name)
    return kept
