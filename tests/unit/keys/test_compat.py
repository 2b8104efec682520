"""gateway.keys.compat and the per-model key fields: LiteLLM fields refused with what to use."""
import pytest

from gateway.core.errors import GatewayError
from gateway.keys.compat import UNSUPPORTED, without_unsupported
from gateway.keys.fields import KEY_FIELDS, validate_fields


@pytest.mark.parametrize("value", [None, {}, [], False, 0, 0.0])
def test_a_nothing_value_is_accepted_and_dropped(value):
    assert validate_fields({"config": value, "rpm_limit": 3}, KEY_FIELDS) == {"rpm_limit": 3}


def test_key_type_default_is_nothing_but_another_type_is_refused():
    assert without_unsupported({"key_type": "default"}) == {}
    with pytest.raises(GatewayError) as err:
        without_unsupported({"key_type": "management"})
    assert err.value.param == "key_type" and "allowed_routes" in err.value.message


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_every_refusal_names_the_field_and_an_alternative(field):
    with pytest.raises(GatewayError) as err:
        without_unsupported({field: "something"})
    assert err.value.status == 400 and err.value.param == field
    assert err.value.message.startswith(f"{field}: this gateway does not support {field}; ")


def test_per_model_fields_are_kept_in_litellm_shape():
    fields = validate_fields({"model_rpm_limit": {"m": 5}, "model_tpm_limit": {"m": 0}, "aliases": {"a": "m"},
                              "model_max_budget": {"m": {"budget_limit": 1, "time_period": " 1d"}}}, KEY_FIELDS)
    assert fields["model_max_budget"] == {"m": {"budget_limit": 1.0, "time_period": "1d"}}
    assert fields["model_rpm_limit"] == {"m": 5} and fields["aliases"] == {"a": "m"}
