"""gateway/keys/fields.py: validation of a virtual key's fields; every error names its field."""
from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.core.errors import GatewayError
from gateway.keys.fields import (KEY_FIELDS, MAX_LIST, MAX_TEXT, encodable, reject_unknown, require_object,
                                 validate_fields)


def refused(payload: dict, allowed=KEY_FIELDS) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        validate_fields(payload, allowed)
    assert err.value.status == 400
    assert err.value.type == "bad_request_error"
    return err.value


def test_a_valid_payload_passes_normalised():
    payload = {
        "key_alias": "team-a", "duration": " 30d ", "models": ["llama", "whisper"], "max_budget": 10,
        "budget_duration": "1mo", "metadata": {"owner": "ops"}, "user_id": "u1", "team_id": "t1",
        "rpm_limit": 60, "tpm_limit": 0, "max_parallel_requests": None,
        "allowed_routes": ["/v1/chat/completions", "/v1/*"], "key": "sk-custom-0123456789",
        "blocked": False, "tags": ["prod"],
    }
    out = validate_fields(payload, KEY_FIELDS)
    assert out["duration"] == "30d"
    assert out["max_budget"] == 10.0 and isinstance(out["max_budget"], float)
    assert out["models"] == ["llama", "whisper"]
    assert out["max_parallel_requests"] is None
    assert out["key"] == "sk-custom-0123456789"
    assert set(out) == set(payload)


def test_null_fields_take_their_empty_values():
    out = validate_fields({name: None for name in KEY_FIELDS}, KEY_FIELDS)
    assert out["models"] == [] and out["tags"] == [] and out["allowed_routes"] == []
    assert out["metadata"] == {}
    assert out["blocked"] is False
    assert out["key_alias"] is None and out["rpm_limit"] is None and out["duration"] is None


def test_an_empty_payload_passes():
    assert validate_fields({}, KEY_FIELDS) == {}


@pytest.mark.parametrize("field, value, param", [
    # text
    ("key_alias", "", "key_alias"),
    ("key_alias", "   ", "key_alias"),
    ("key_alias", 5, "key_alias"),
    ("user_id", "x" * (MAX_TEXT + 1), "user_id"),
    ("team_id", "bad\ud800", "team_id"),
    # lists of text
    ("models", "llama", "models"),
    ("models", ["ok"] * (MAX_LIST + 1), "models"),
    ("models", ["llama", 3], "models[1]"),
    ("tags", ["", "x"], "tags[0]"),
    # counts
    ("rpm_limit", -1, "rpm_limit"),
    ("tpm_limit", 10**12 + 1, "tpm_limit"),
    ("max_parallel_requests", 1.5, "max_parallel_requests"),
    ("rpm_limit", 2.0, "rpm_limit"),
    ("rpm_limit", True, "rpm_limit"),
    ("rpm_limit", "10", "rpm_limit"),
    # money
    ("max_budget", -0.01, "max_budget"),
    ("max_budget", float("nan"), "max_budget"),
    ("max_budget", float("inf"), "max_budget"),
    ("max_budget", 10**400, "max_budget"),
    ("max_budget", True, "max_budget"),
    ("max_budget", "5", "max_budget"),
    ("max_budget", Decimal("NaN"), "max_budget"),
    ("max_budget", Decimal("-Infinity"), "max_budget"),
    ("max_budget", Decimal("1e999999"), "max_budget"),
    ("max_budget", 10**9 + 1, "max_budget"),
    ("max_budget", Decimal("0.0000000001"), "max_budget"),      # a tenth of a nano-dollar
    ("max_budget", Decimal("123456789.123456789"), "max_budget"),  # 18 significant digits
    # durations
    ("duration", "30dx", "duration"),
    ("budget_duration", 30, "budget_duration"),
    # routes
    ("allowed_routes", ["/v1/models", "v1/chat"], "allowed_routes[1]"),
    ("allowed_routes", "/v1/*", "allowed_routes"),
    # custom key
    ("key", "pk-0123456789abcdef", "key"),
    ("key", "sk-short", "key"),
    ("key", "sk-" + "a" * 254, "key"),
    ("key", "sk-0123456789 abcdef", "key"),
    ("key", "sk-0123456789abcd\xe9", "key"),
    ("key", 12345678901234567890, "key"),
    # metadata and flags
    ("metadata", ["a"], "metadata"),
    ("metadata", "x", "metadata"),
    ("blocked", "true", "blocked"),
    ("blocked", 1, "blocked"),
])
def test_a_wrong_value_is_refused_naming_its_field(field, value, param):
    err = refused({field: value})
    assert err.param == param
    assert err.message.startswith(f"{param}: ")


@pytest.mark.parametrize("field, value", [
    ("rpm_limit", 0), ("rpm_limit", 10**12), ("max_budget", 0), ("max_budget", 10**9),
    ("key_alias", "x" * MAX_TEXT), ("models", ["m"] * MAX_LIST), ("key", "sk-" + "a" * 13),
    ("key", "sk-" + "a" * 253), ("blocked", True), ("metadata", {}),
])
def test_boundary_values_are_accepted(field, value):
    assert validate_fields({field: value}, KEY_FIELDS)[field] == value


@pytest.mark.parametrize("sent, kept", [
    (Decimal("0.051"), 0.051), (Decimal("0.1"), 0.1), (Decimal("0.000000001"), 1e-9), (Decimal("12.5"), 12.5),
    (Decimal("999999.999999999"), 999999.999999999), (Decimal("1E+9"), 1e9), (Decimal("-0.0"), 0.0),
    (Decimal("1.50000000000000000000"), 1.5), (7, 7.0),
])
def test_max_budget_is_kept_as_the_json_number_of_exactly_what_was_sent(sent, kept):
    """Read as Decimal, stored as the double that prints as the same decimal: no binary noise in
    and none out (a double prints up to 15 significant digits back exactly)."""
    out = validate_fields({"max_budget": sent}, KEY_FIELDS)["max_budget"]
    assert isinstance(out, float) and out == kept and Decimal(repr(out)) == Decimal(sent)


@pytest.mark.parametrize("value, says", [
    (Decimal("0.0000000001"), "at most 9 decimal places"),
    (Decimal("123456789.123456789"), "at most 15 significant digits"),
    (Decimal("NaN"), "finite"), (float("inf"), "finite"), (Decimal("-0.5"), "must not be negative"),
    (Decimal("2e9"), "at most 1000000000"),
])
def test_a_bad_max_budget_says_what_is_wrong(value, says):
    assert says in refused({"max_budget": value}).message


def test_a_bad_duration_explains_the_grammar():
    err = refused({"duration": "1y"})
    assert "s, m, h, d, w, mo" in err.message


def test_unknown_fields_are_refused_by_name():
    err = refused({"key_alias": "a", "rpm_limt": 5})  # a typo must not mean "no limit"
    assert err.param == "rpm_limt"
    assert "unknown field" in err.message
    assert "key_alias" in err.message  # lists what is accepted


def test_a_known_field_outside_the_allowed_set_is_refused():
    err = refused({"key": "sk-0123456789abcdef"}, allowed={"key_alias", "blocked"})
    assert err.param == "key"


def test_reject_unknown_returns_the_payload_when_all_fields_are_allowed():
    payload = {"key": "k", "key_alias": "a"}
    assert reject_unknown(payload, {"key", "key_alias", "new_key"}) is payload


@pytest.mark.parametrize("payload", [[], ["key"], "key", 1, None])
def test_require_object_refuses_a_non_object(payload):
    with pytest.raises(GatewayError) as err:
        require_object(payload)
    assert err.value.status == 400
    assert "JSON object" in err.value.message
    with pytest.raises(GatewayError):
        reject_unknown(payload, {"key"})


def test_require_object_returns_an_object():
    payload = {"a": 1}
    assert require_object(payload) is payload


@pytest.mark.parametrize("text, ok", [("plain", True), ("caf\xe9 \u20ac \U0001F600", True),
                                      ("\ud800", False), ("a\udfffb", False)])
def test_encodable_refuses_lone_surrogates(text, ok):
    assert encodable(text) is ok
