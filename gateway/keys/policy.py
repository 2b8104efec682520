"""What a virtual key may do on /vllm: which vLLM routes, which models.

The master key skips all of this. Route checks work on the decoded, slash-collapsed path,
so `/v1/load%5Flora_adapter` or `//sleep` cannot slip past a rule.
"""
from __future__ import annotations

import re
from urllib.parse import unquote

from gateway.core.errors import GatewayError
from gateway.keys.fields import ALL_PROXY_MODELS

# What a virtual key may call, the rule written down (README, "What a virtual key may call"):
#   1. every route under a prefix that vLLM's own `--api-key` guards (`/v1/`, `/v2/`,
#      `/inference/`): vLLM itself treats these as its client API;
#   2. vLLM's inference routes outside those prefixes, named one by one;
#   3. its read-only status routes.
# Anything else is refused until it is added here deliberately: a new vLLM route is more often
# an operator tool than an inference endpoint. Checked against vLLM 0.32 (reference.md §2, §6).
DEFAULT_ALLOWED = ("/v1/", "/v2/", "/inference/",
                   "/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank",
                   "/invocations", "/generative_scoring",
                   "/health", "/ping", "/version", "/load", "/metrics")
# Operator routes: never for a virtual key, even inside /v1 or when allowed_routes names them.
OPERATOR_ROUTES = ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_", "/server_info",
                   "/start_profile", "/stop_profile", "/pause", "/resume", "/is_paused",
                   "/update_weights", "/scale_elastic_ep", "/v1/load_lora_adapter",
                   "/v1/unload_lora_adapter", "/release_kv_cache_memory", "/fault_tolerance")


def policy_path(path: str) -> str:
    """vLLM's path decoded, repeated slashes collapsed, lower-cased."""
    for _ in range(3):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = re.sub(r"/{2,}", "/", path.replace("\\", "/")).lower()
    return path or "/"


def _matches(path: str, rule: str) -> bool:
    """A rule is an exact path, a prefix ending in '/', or a prefix ending in '*'."""
    rule = rule.lower()
    if rule.endswith("*"):
        return path.startswith(rule[:-1])
    if rule.endswith("/"):
        return path.startswith(rule)
    return path == rule or path.startswith(rule + "/")


def check_route(path: str, key: dict) -> None:
    """403 unless the key may call this vLLM path."""
    if any(path.startswith(r) for r in OPERATOR_ROUTES):
        raise GatewayError(403, f"virtual keys may not call vLLM's operator route {path}", "permission_error")
    if not any(_matches(path, r) for r in DEFAULT_ALLOWED):
        raise GatewayError(403, f"virtual keys may not call {path}", "permission_error")
    allowed = [r[5:] if r.lower().startswith("/vllm/") else r for r in key.get("allowed_routes") or []]
    if allowed and not any(_matches(path, r) for r in allowed):
        raise GatewayError(403, f"this key's allowed_routes do not include {path}", "permission_error")


def check_model(fields: dict | None, key: dict, has_body: bool) -> None:
    """With a model allow-list, the body's model must be on it; unreadable means refused."""
    check_model_list(fields, key.get("models"), has_body, "this key", "key_model_access_denied")


def check_model_list(fields: dict | None, models, has_body: bool, holder: str, error_type: str) -> None:
    """The rule of a key's or a team's `models` (`holder`: "this key", "this key's team"): none,
    or LiteLLM's "all-proxy-models", allows every model; a request without a body has nothing to
    check; otherwise the body's model must be on the list, and one that cannot be read is refused."""
    if not models or not has_body or ALL_PROXY_MODELS in models:
        return
    model = fields.get("model") if fields is not None else None
    if not isinstance(model, str):
        raise GatewayError(403, f"{holder} is limited to certain models and the request's model could "
                                "not be read from its body", error_type, param="model")
    if model not in models:
        raise GatewayError(403, f"{holder} may not use model {model!r}", error_type, param="model")


def aliased_model(fields: dict | None, key: dict) -> str | None:
    """The model a key's `aliases` maps the body's `model` to, or None (no alias applies).
    The rewrite happens before the model check, so `models` and the per-model limits name the
    real model, the one vLLM serves and accounting records."""
    aliases = key.get("aliases")
    model = fields.get("model") if fields is not None and aliases else None
    if isinstance(model, str) and model in aliases:
        return aliases[model]
    return None
