"""gateway/keys/policy.py: which vLLM routes and models a virtual key may use."""
from __future__ import annotations

import pytest

from gateway.core.errors import GatewayError
from gateway.keys.policy import body_fields, check_model, check_route, policy_path

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


# --- body_fields -------------------------------------------------------------------------------

def test_body_fields_of_a_json_object_are_its_top_level_fields():
    assert body_fields(b'{"model": "m", "messages": [{"role": "user"}]}', "application/json") == {
        "model": "m", "messages": [{"role": "user"}]}


def test_body_fields_read_json_whatever_the_content_type():
    assert body_fields(b'{"model": "m"}', None) == {"model": "m"}
    assert body_fields(b'{"model": "m"}', "text/plain") == {"model": "m"}


def test_body_fields_duplicate_json_key_takes_the_last_value_as_vllm_does():
    assert body_fields(b'{"model": "allowed", "model": "other"}', "application/json") == {"model": "other"}


@pytest.mark.parametrize("body", [b'["model"]', b'"model"', b"42", b"null", b"true"])
def test_body_fields_of_a_json_non_object_is_none(body):
    assert body_fields(body, "application/json") is None


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"model": "m",}', b"\xff\xfe\x00"])
def test_body_fields_of_invalid_json_is_none(body):
    assert body_fields(body, "application/json") is None


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"a":' * 200_000])
def test_body_fields_of_absurdly_deep_json_is_none_not_a_crash(body):
    assert body_fields(body, "application/json") is None


def test_body_fields_of_multipart_are_its_text_fields():
    body, ctype = multipart(("model", "whisper"), ("language", "en"))
    assert body_fields(body, ctype) == {"model": "whisper", "language": "en"}


def test_body_fields_multipart_leaves_out_file_parts():
    body = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--B--\r\n")
    assert body_fields(body, "multipart/form-data; boundary=B") == {"model": "whisper"}


def test_body_fields_multipart_field_sent_twice_with_different_values_is_a_list():
    body, ctype = multipart(("model", "allowed"), ("model", "forbidden"))
    assert body_fields(body, ctype) == {"model": ["allowed", "forbidden"]}


def test_body_fields_multipart_field_sent_twice_with_the_same_value_is_that_value():
    body, ctype = multipart(("model", "m"), ("model", "m"))
    assert body_fields(body, ctype) == {"model": "m"}


@pytest.mark.parametrize("body, ctype", [
    (b"garbage", "multipart/form-data; boundary=B"),
    (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--B--\r\n', "multipart/form-data"),
])
def test_body_fields_of_malformed_multipart_is_none(body, ctype):
    assert body_fields(body, ctype) is None


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
