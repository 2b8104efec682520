"""gateway/usage/prices.py: per-model prices from MODEL_PRICES or MODEL_PRICES_FILE, and cost."""
from __future__ import annotations

import json

import pytest

from gateway.core.config import ConfigError
from gateway.usage.prices import cost, load_prices, parse_prices


def parse(table) -> dict:
    return parse_prices(table if isinstance(table, str) else json.dumps(table), "MODEL_PRICES")


# --- parse_prices ------------------------------------------------------------------------------

def test_per_token_prices_are_taken_as_they_are():
    assert parse({"llama": {"input_cost_per_token": 5e-7, "output_cost_per_token": 1.5e-6}}) == {
        "llama": (5e-7, 1.5e-6)}


def test_per_million_prices_are_scaled_to_per_token():
    price_in, price_out = parse({"llama": {"input_cost_per_million": 0.5, "output_cost_per_million": 2}})["llama"]
    assert price_in == pytest.approx(5e-7)
    assert price_out == pytest.approx(2e-6)


@pytest.mark.parametrize("entry, expected", [
    ({"input_cost_per_token": 1e-6}, (1e-6, 0)),
    ({"output_cost_per_token": 1e-6}, (0, 1e-6)),
    ({"output_cost_per_million": 3}, (0, 3e-6)),
    ({}, (0, 0)),
])
def test_a_missing_price_is_zero(entry, expected):
    assert parse({"m": entry})["m"] == pytest.approx(expected)


def test_several_models_each_in_their_own_form():
    prices = parse({"a": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
                    "b": {"input_cost_per_million": 1, "output_cost_per_million": 2}})
    assert prices["a"] == pytest.approx((1e-6, 2e-6))
    assert prices["b"] == pytest.approx((1e-6, 2e-6))


def test_an_empty_table_is_no_prices():
    assert parse({}) == {}


@pytest.mark.parametrize("text", ["", "{", "not json", "{'a': {}}", '{"a": {},}'])
def test_invalid_json_is_a_config_error_naming_the_source(text):
    with pytest.raises(ConfigError, match="MODEL_PRICES is not valid JSON"):
        parse_prices(text, "MODEL_PRICES")


@pytest.mark.parametrize("text", ["[]", '"x"', "1", "null"])
def test_a_table_that_is_not_an_object_is_a_config_error(text):
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse(text)


@pytest.mark.parametrize("entry", [0.5, "0.5", None, [1, 2]])
def test_a_model_entry_that_is_not_an_object_is_a_config_error(entry):
    with pytest.raises(ConfigError, match="'m' must be an object"):
        parse({"m": entry})


@pytest.mark.parametrize("entry", [
    {"input_cost_per_token": 1e-6, "output_cost_per_million": 1},   # the two forms mixed
    {"input_cost_per_million": 1, "input_cost_per_token": 1e-6},
    {"input_cost_per_million": 1, "cache_cost": 1},
    {"input_price": 1},
])
def test_unknown_or_mixed_fields_are_a_config_error(entry):
    with pytest.raises(ConfigError, match="unknown fields"):
        parse({"m": entry})


@pytest.mark.parametrize("text", [
    '{"m": {"input_cost_per_token": -1e-6}}',
    '{"m": {"output_cost_per_million": -1}}',
    '{"m": {"input_cost_per_token": NaN}}',
    '{"m": {"input_cost_per_token": Infinity}}',
    '{"m": {"output_cost_per_million": -Infinity}}',
    '{"m": {"input_cost_per_million": 1e999}}',
    '{"m": {"input_cost_per_token": "1e-6"}}',
    '{"m": {"input_cost_per_token": true}}',
    '{"m": {"input_cost_per_token": null}}',
])
def test_negative_non_finite_or_non_number_prices_are_a_config_error(text):
    with pytest.raises(ConfigError, match="must be a non-negative number"):
        parse_prices(text, "MODEL_PRICES")


# --- load_prices -------------------------------------------------------------------------------

PRICES_JSON = '{"llama": {"input_cost_per_million": 1, "output_cost_per_million": 2}}'


def test_load_prices_from_the_environment_variable():
    assert load_prices({"MODEL_PRICES": PRICES_JSON})["llama"] == pytest.approx((1e-6, 2e-6))


def test_load_prices_from_a_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(PRICES_JSON, encoding="utf-8")
    assert load_prices({"MODEL_PRICES_FILE": str(path)})["llama"] == pytest.approx((1e-6, 2e-6))


def test_load_prices_variable_wins_over_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"other": {}}', encoding="utf-8")
    assert set(load_prices({"MODEL_PRICES": PRICES_JSON, "MODEL_PRICES_FILE": str(path)})) == {"llama"}


def test_load_prices_blank_variable_falls_through_to_the_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(PRICES_JSON, encoding="utf-8")
    assert set(load_prices({"MODEL_PRICES": "   ", "MODEL_PRICES_FILE": f" {path} "})) == {"llama"}


@pytest.mark.parametrize("environ", [{}, {"MODEL_PRICES": ""}, {"MODEL_PRICES": " ", "MODEL_PRICES_FILE": ""}])
def test_load_prices_without_configuration_is_empty(environ):
    assert load_prices(environ) == {}


def test_load_prices_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="MODEL_PRICES_FILE cannot be read"):
        load_prices({"MODEL_PRICES_FILE": str(tmp_path / "absent.json")})


def test_load_prices_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="MODEL_PRICES_FILE cannot be read"):
        load_prices({"MODEL_PRICES_FILE": str(tmp_path)})


def test_load_prices_bad_file_content_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"m": {"input_cost_per_token": -1}}', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_prices({"MODEL_PRICES_FILE": str(path)})
    assert f"MODEL_PRICES_FILE ({path})" in str(err.value)


def test_load_prices_bad_variable_is_a_config_error():
    with pytest.raises(ConfigError, match="MODEL_PRICES is not valid JSON"):
        load_prices({"MODEL_PRICES": "{nope"})


# --- cost --------------------------------------------------------------------------------------

PRICES = {"llama": (1e-6, 2e-6)}


def test_cost_is_tokens_times_prices():
    assert cost(PRICES, "llama", 1000, 500) == pytest.approx(1000 * 1e-6 + 500 * 2e-6)


@pytest.mark.parametrize("model", ["unknown", "LLAMA", "", None])
def test_cost_of_an_unknown_model_is_zero(model):
    assert cost(PRICES, model, 1000, 500) == 0


def test_cost_with_no_prices_is_zero():
    assert cost({}, "llama", 10**6, 10**6) == 0


def test_a_prices_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "prices.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_prices({"MODEL_PRICES_FILE": str(path)})
