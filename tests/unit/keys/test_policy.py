"""gateway/keys/policy.py: which vLLM routes and models a virtual key may use."""
from __future__ import annotations

import pytest

from gateway.core.errors import GatewayError
from gateway.keys.policy import check_model, check_route, policy_path
from gateway.relay.bodyfields import body_fields

NO_RULES: dict = {}


def route_allowed(raw_path: str, key: dict = NO_RULES) -> bool:
    """What the relay does: normalise the vLLM path, then check it."""
    try:
        check_route(policy_path(raw_path), key)
    except GatewayError as exc:
        assert exc.status == 403
        assert exc.type == "permission_error"
        return False
    return True


def multipart(*fields: tuple[str, str], boundary: str = "B0undary") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --- policy_path -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("/v1/models", "/v1/models"),
    ("/%73leep", "/sleep"),
    ("/%2573leep", "/sleep"),                     # encoded twice
    ("/%252573leep", "/sleep"),                   # encoded three times
    ("/v1/load%5Flora_adapter", "/v1/load_lora_adapter"),
    ("//sleep", "/sleep"),
    ("/v1///chat//completions", "/v1/chat/completions"),
    ("/%2F%2Fsleep", "/sleep"),                   # slashes that were encoded still collapse
    ("\\sleep", "/sleep"),                        # backslash counts as a slash
    ("/SLEEP", "/sleep"),
    ("/V1/Chat/Completions", "/v1/chat/completions"),
    ("", "/"),
])
def test_policy_path_decodes_collapses_slashes_and_lowercases(raw, expected):
    assert policy_path(raw) == expected


# --- check_route: defaults ---------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses",
    "/v1/audio/transcriptions", "/v2/anything", "/inference/v1/generate",
    "/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank", "/invocations",
    "/generative_scoring",
    "/health", "/ping", "/version", "/load", "/metrics",
])
def test_default_routes_are_allowed(path):
    assert route_allowed(path)


@pytest.mark.parametrize("path", [
    "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache",
    "/server_info", "/start_profile", "/stop_profile", "/pause", "/resume", "/is_paused",
    "/update_weights", "/scale_elastic_ep", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/release_kv_cache_memory", "/fault_tolerance",
])
def test_operator_routes_are_refused(path):
    with pytest.raises(GatewayError) as err:
        check_route(path, NO_RULES)
    assert err.value.status == 403
    assert "operator route" in err.value.message


@pytest.mark.parametrize("raw", [
    "/%73leep", "/%2573leep", "//sleep", "/SLEEP", "/Sleep", "\\sleep", "/%2Fsleep",
    "/v1/load%5Flora_adapter", "/v1/load%255Flora_adapter", "/V1/LOAD_LORA_ADAPTER",
    "//v1//load_lora_adapter", "/v1/unload%5flora%5fadapter", "/%77ake_up", "/reset%5Fprefix_cache",
])
def test_operator_routes_are_refused_however_encoded(raw):
    assert not route_allowed(raw)


def test_operator_route_is_refused_even_when_allowed_routes_names_it():
    key = {"allowed_routes": ["/sleep", "/v1/load_lora_adapter", "/v1/*"]}
    assert not route_allowed("/sleep", key)
    assert not route_allowed("/v1/load_lora_adapter", key)


@pytest.mark.parametrize("path", [
    "/", "/admin", "/docs", "/openapi.json", "/v1", "/v3/x", "/inference", "/tokenizer",
    "/healthz", "/metricsx", "/generative_scoring_extra", "/vllm/v1/models",
])
def test_unknown_routes_are_refused(path):
    assert not route_allowed(path)


def test_default_exact_route_also_covers_its_subpaths_but_not_a_longer_name():
    assert route_allowed("/tokenize/extra")
    assert not route_allowed("/tokenizer")


# --- check_route: allowed_routes narrowing -----------------------------------------------------

@pytest.mark.parametrize("rules, path, allowed", [
    # exact rule
    (["/v1/chat/completions"], "/v1/chat/completions", True),
    (["/v1/chat/completions"], "/v1/completions", False),
    (["/v1/chat/completions"], "/v1/chat/completionsx", False),
    (["/v1/chat/completions"], "/v1/chat/completions/sub", True),
    # prefix ending in '/'
    (["/v1/"], "/v1/embeddings", True),
    (["/v1/"], "/tokenize", False),
    (["/v1/chat/"], "/v1/chat/completions", True),
    (["/v1/chat/"], "/v1/completions", False),
    # prefix ending in '*'
    (["/v1/*"], "/v1/models", True),
    (["/v1/chat*"], "/v1/chat/completions", True),
    (["/v1/chat*"], "/v1/embeddings", False),
    # '/vllm'-prefixed rules are read without it
    (["/vllm/v1/chat/completions"], "/v1/chat/completions", True),
    (["/vllm/v1/chat/completions"], "/v1/embeddings", False),
    (["/vllm/v1/*"], "/v1/models", True),
    (["/VLLM/v1/*"], "/v1/models", True),
    # rules are case-insensitive like the path
    (["/V1/Chat/Completions"], "/v1/chat/completions", True),
    # several rules: any one suffices
    (["/tokenize", "/v1/embeddings"], "/v1/embeddings", True),
    (["/tokenize", "/v1/embeddings"], "/detokenize", False),
])
def test_allowed_routes_narrow_the_defaults(rules, path, allowed):
    assert route_allowed(path, {"allowed_routes": rules}) is allowed


@pytest.mark.parametrize("rules", [["/*"], ["/"], ["/admin"], ["/admin/*"], ["/vllm/*"]])
@pytest.mark.parametrize("path", ["/admin", "/docs", "/sleep"])
def test_allowed_routes_never_widen_the_defaults(rules, path):
    assert not route_allowed(path, {"allowed_routes": rules})


def test_narrowed_key_is_told_its_allowed_routes_refused():
    with pytest.raises(GatewayError) as err:
        check_route("/v1/embeddings", {"allowed_routes": ["/v1/chat/completions"]})
    assert err.value.status == 403
    assert "allowed_routes" in err.value.message


@pytest.mark.parametrize("key", [{}, {"allowed_routes": None}, {"allowed_routes": []}])
def test_no_allowed_routes_means_all_defaults(key):
    assert route_allowed("/v1/chat/completions", key)
    assert route_allowed("/tokenize", key)


# --- check_model -------------------------------------------------------------------------------

LIMITED = {"models": ["llama", "whisper"]}


@pytest.mark.parametrize("key", [{}, {"models": None}, {"models": []}])
def test_check_model_without_a_models_list_allows_anything(key):
    check_model({"model": "anything"}, key, has_body=True)
    check_model(None, key, has_body=True)


def test_check_model_allows_a_listed_model():
    check_model({"model": "llama"}, LIMITED, has_body=True)


def test_check_model_skips_requests_without_a_body():
    check_model(None, LIMITED, has_body=False)


@pytest.mark.parametrize("fields", [
    None,                              # unreadable body
    {},                                # no model field
    {"model": None},
    {"model": 7},
    {"model": ["llama"]},
    {"model": ["llama", "other"]},     # multipart field sent twice
    {"model": "other"},                # not on the list
    {"model": "LLAMA"},                # the list is case-sensitive
])
def test_check_model_refuses_a_model_not_readable_or_not_listed(fields):
    with pytest.raises(GatewayError) as err:
        check_model(fields, LIMITED, has_body=True)
    assert err.value.status == 403
    assert err.value.type == "key_model_access_denied"
    assert err.value.param == "model"


def test_check_model_refuses_a_multipart_model_sent_twice_end_to_end():
    body, ctype = multipart(("model", "llama"), ("model", "secret-model"))
    with pytest.raises(GatewayError) as err:
        check_model(body_fields(body, ctype), LIMITED, has_body=True)
    assert err.value.type == "key_model_access_denied"


def test_all_proxy_models_lifts_the_model_restriction():
    from gateway.keys.policy import check_model
    check_model({"model": "anything"}, {"models": ["all-proxy-models"]}, True)


def test_aliased_model_maps_only_a_string_alias():
    from gateway.keys.policy import aliased_model
    key = {"aliases": {"fast": "real"}}
    assert aliased_model({"model": "fast"}, key) == "real"
    assert aliased_model({"model": "real"}, key) is None
    assert aliased_model({"model": ["fast"]}, key) is None
    assert aliased_model({"model": "fast"}, {}) is None and aliased_model(None, key) is None
