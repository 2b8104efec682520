"""LiteLLM field compatibility of /key/generate and /key/update (issue 16, item 4): every field
LiteLLM documents either works or is refused with a message saying what to use instead;
`all-proxy-models`; `aliases`, the one sanctioned body rewrite."""
import base64
import json

import pytest

from gateway.keys.compat import UNSUPPORTED
from gateway.keys.fields import KEY_FIELDS
from tests.conftest import MASTER

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}

# Every field of LiteLLM 1.95's GenerateKeyRequest, with a value a LiteLLM script would send.
SUPPORTED = {
    "key_alias": "compat-script", "duration": "30d", "models": ["fake-model"], "max_budget": 12.5,
    "soft_budget": 10, "user_id": "u1", "max_parallel_requests": 4, "metadata": {"app": "x"},
    "tpm_limit": 100000, "rpm_limit": 100, "budget_duration": "30d", "blocked": False,
    "aliases": {"fast": "fake-model"}, "tags": ["prod"], "allowed_routes": ["/v1/*"],
    "key": "sk-compat-script-0123456789", "model_rpm_limit": {"fake-model": 50},
    "model_tpm_limit": {"fake-model": 5000},
    "model_max_budget": {"fake-model": {"budget_limit": 0.5, "time_period": "1d"}},
}
ASKING = {  # a value that asks for something the gateway lacks
    "spend": 3.0, "agent_id": "a", "project_id": "p", "organization_id": "org", "budget_id": "tier",
    "budget_limits": [{"budget_duration": "1d", "max_budget": 1}], "budget_fallbacks": {"m": ["n"]},
    "throttle_on_budget_exceeded": True, "permissions": {"get_spend_routes": False},
    "object_permission": {"mcp_servers": ["s"]}, "access_group_ids": ["g"],
    "allowed_passthrough_routes": ["/x"], "allowed_cache_controls": ["no-cache"],
    "allowed_vector_store_indexes": [{"index_name": "i", "index_permissions": ["read"]}],
    "mcp_rpm_limit": {"s": 1}, "tag_rpm_limit": {"t": 1}, "rpm_limit_type": "guaranteed_throughput",
    "tpm_limit_type": "dynamic", "guardrails": ["g"], "policies": ["p"], "disable_global_guardrails": True,
    "prompts": ["p"], "enforced_params": ["user"], "config": {"x": 1}, "router_settings": {"num_retries": 2},
    "key_type": "llm_api", "send_invite_email": True, "auto_rotate": True, "rotation_interval": "30d",
    "temp_budget_increase": 5, "temp_budget_expiry": "2030-01-01",
}
NOTHING = {  # what LiteLLM's SDK and UI send by habit: accepted and dropped
    "spend": 0, "config": {}, "permissions": {}, "allowed_cache_controls": [], "send_invite_email": False,
    "key_type": "default", "auto_rotate": False, "guardrails": None, "enforced_params": [],
    "organization_id": None, "budget_id": None,
}


def test_every_litellm_field_is_either_known_or_refused_by_name():
    assert set(ASKING) == set(UNSUPPORTED)
    assert not set(UNSUPPORTED) & set(KEY_FIELDS)


def test_litellm_script_every_supported_field_works(kclient):
    resp = kclient.post("/key/generate", headers=MASTER, json={**SUPPORTED, "team_id": None, **NOTHING})
    assert resp.status_code == 200, resp.get_json()
    created = resp.get_json()
    for name, value in SUPPORTED.items():
        if name != "key":
            assert created[name] == value, name
    info = kclient.get(f"/key/info?key={created['key']}", headers=MASTER).get_json()["info"]
    assert info["model_max_budget"] == {"fake-model": {"budget_limit": 0.5, "time_period": "1d"}}
    assert not (set(NOTHING) - {"spend"}) & set(info), "nothing values are dropped, not stored"
    assert info["spend"] == 0  # the usage total, not the field


@pytest.mark.parametrize("field", sorted(ASKING))
def test_unsupported_field_refused_with_what_to_use(kclient, field):
    for route, extra in (("/key/generate", {}), ("/key/update", {"key_alias": "compat-up"})):
        if route == "/key/update":
            kclient.post("/key/generate", headers=MASTER, json={"key_alias": "compat-up"})
        resp = kclient.post(route, headers=MASTER, json={**extra, field: ASKING[field]})
        assert resp.status_code == 400
        err = resp.get_json()["error"]
        assert err["param"] == field
        assert f"this gateway does not support {field}; " in err["message"]
        assert err["message"].endswith(UNSUPPORTED[field])


@pytest.mark.parametrize("bad", [
    {"aliases": ["fast"]}, {"aliases": {"fast": 3}}, {"model_rpm_limit": {"m": -1}},
    {"model_tpm_limit": {"m": "10"}}, {"model_rpm_limit": {"m": None}},
    {"model_max_budget": {"m": 5}}, {"model_max_budget": {"m": {"budget_limit": 1}}},
    {"model_max_budget": {"m": {"budget_limit": 1, "time_period": "1 fortnight"}}},
    {"model_max_budget": {"m": {"budget_limit": 0.1234567891, "time_period": "1d"}}},
    {"model_max_budget": {"m": {"max_budget": 1, "time_period": "1d"}}},
])
def test_bad_per_model_fields_are_400_naming_the_field(kclient, bad):
    resp = kclient.post("/key/generate", headers=MASTER, json=bad)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["param"].startswith(next(iter(bad)))


def test_model_max_budget_is_exact_money(kclient):
    raw = b'{"model_max_budget": {"fake-model": {"budget_limit": 0.1, "time_period": "1h"}}}'
    resp = kclient.post("/key/generate", headers={**MASTER, "Content-Type": "application/json"}, data=raw)
    assert resp.status_code == 200
    assert b'"budget_limit":0.1' in resp.data.replace(b" ", b"")


def _key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def test_all_proxy_models_means_every_model(kclient, vllm):
    created, auth = _key(kclient, models=["all-proxy-models"])
    assert created["models"] == ["all-proxy-models"]
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "model": "any-model-at-all"})
    assert resp.status_code == 404  # reached vLLM, which does not serve it: not our 403
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    info = kclient.get("/key/info", headers=auth).get_json()["info"]
    assert info["models"] == ["all-proxy-models"]


def _sent_body(vllm) -> bytes:
    return base64.b64decode(vllm.last()["body_b64"])


def test_alias_rewrites_only_the_model_value(kclient, vllm):
    _, auth = _key(kclient, aliases={"fast": "fake-model"}, models=["fake-model"])
    raw = b'{ "messages" : [{"role":"user","content":"hi \\u00e9", "model": "fast"}],\n  "model" :"fast", "n":1}'
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "Content-Type": "application/json"}, data=raw)
    assert resp.status_code == 200
    assert resp.get_json()["model"] == "fake-model"
    assert _sent_body(vllm) == raw.replace(b'"model" :"fast"', b'"model" :"fake-model"')
    headers = {name.lower(): value for name, value in vllm.last()["headers"]}
    assert int(headers["content-length"]) == len(_sent_body(vllm))


def test_body_without_alias_is_sent_byte_for_byte(kclient, vllm):
    _, auth = _key(kclient, aliases={"fast": "fake-model"})
    raw = b'{"model":  "fake-model" , "messages":[{"role":"user","content":"fast"}]}'
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "Content-Type": "application/json"}, data=raw)
    assert resp.status_code == 200 and _sent_body(vllm) == raw


def test_alias_then_model_check_on_real_model(kclient, vllm):
    """The key's models list names the real model: the alias resolves first."""
    _, auth = _key(kclient, aliases={"fast": "fake-model", "other": "not-allowed"}, models=["fake-model"])
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "model": "fast"}).status_code == 200
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "model": "other"})
    assert resp.status_code == 403 and "not-allowed" in resp.get_json()["error"]["message"]


def test_alias_off_unless_set(kclient, vllm):
    _, auth = _key(kclient)
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "model": "fast"})
    assert resp.status_code == 404
    assert json.loads(_sent_body(vllm))["model"] == "fast"
