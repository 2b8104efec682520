"""gateway/usage/prices.py: per-model prices from MODEL_PRICES or MODEL_PRICES_FILE, exact to
1e-18 USD a token, and a request's cost in nano-dollars (cached prompt tokens at their price)."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest

from gateway.core.config import ConfigError
from gateway.usage.prices import MAX_REQUEST_NANOS, Price, cost, load_prices, parse_prices

E = 10**18  # price units (1e-18 USD) per USD


def parse(table) -> dict:
    return parse_prices(table if isinstance(table, str) else json.dumps(table), "MODEL_PRICES")


# --- parse_prices ------------------------------------------------------------------------------

def test_per_token_prices_are_taken_exactly_as_written():
    """1.5e-07 is 150,000,000,000 units of 1e-18 USD, not the double nearest it."""
    assert parse('{"llama": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 1.875e-8}}') == {
        "llama": Price(150_000_000_000, 18_750_000_000, 150_000_000_000)}


def test_per_million_prices_are_scaled_to_per_token():
    assert parse('{"llama": {"input_cost_per_million": 0.5, "output_cost_per_million": 2,'
                 ' "cache_read_input_cost_per_million": 0.01875}}')["llama"] == Price(5 * E // 10**7, 2 * E // 10**6,
                                                                                       18_750_000_000)


@pytest.mark.parametrize("entry, expected", [
    ({"input_cost_per_token": 1e-6}, (E // 10**6, 0, E // 10**6)),
    ({"output_cost_per_token": 1e-6}, (0, E // 10**6, 0)),
    ({"output_cost_per_million": 3}, (0, 3 * E // 10**6, 0)),
    ({"cache_read_input_token_cost": 1e-7}, (0, 0, E // 10**7)),
    ({}, (0, 0, 0)),
])
def test_a_missing_price_is_zero_and_cached_tokens_default_to_the_input_price(entry, expected):
    assert parse({"m": entry})["m"] == expected


def test_several_models_each_in_their_own_form():
    prices = parse({"a": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
                    "b": {"input_cost_per_million": 1, "output_cost_per_million": 2}})
    assert prices["a"] == prices["b"] == Price(E // 10**6, 2 * E // 10**6, E // 10**6)


@pytest.mark.parametrize("text", [
    '{"m": {"input_cost_per_token": 1e-19}}',                       # 19 decimal places a token
    '{"m": {"output_cost_per_token": 0.0000000000000000015}}',
    '{"m": {"input_cost_per_million": 0.0000000000001}}',            # 13 per million = 19 a token
    '{"m": {"cache_read_input_token_cost": 1.0000000000000000001e-7}}',
])
def test_a_price_finer_than_1e18_usd_a_token_is_refused_not_rounded(text):
    with pytest.raises(ConfigError, match="more than 1[28] decimal places"):
        parse(text)


def test_the_finest_prices_are_kept_exactly():
    prices = parse('{"a": {"input_cost_per_token": 1e-18}, "b": {"input_cost_per_million": 0.000000000001}}')
    assert prices["a"].input == prices["b"].input == 1


@pytest.mark.parametrize("text", ['{"m": {"input_cost_per_token": 1.000001}}',
                                  '{"m": {"output_cost_per_million": 1000000.5}}',
                                  '{"m": {"input_cost_per_million": 1e999}}'])
def test_a_price_above_one_dollar_a_token_is_refused(text):
    with pytest.raises(ConfigError, match="at most"):
        parse(text)


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
    {"input_cost_per_million": 1, "cache_read_input_token_cost": 1e-7},
    {"cache_read_input_cost_per_million": 1, "output_cost_per_token": 1e-6},
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


LLAMA = Price(E // 10**6, 2 * E // 10**6, E // 10**6)


def test_load_prices_from_the_environment_variable():
    assert load_prices({"MODEL_PRICES": PRICES_JSON})["llama"] == LLAMA


def test_load_prices_from_a_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(PRICES_JSON, encoding="utf-8")
    assert load_prices({"MODEL_PRICES_FILE": str(path)})["llama"] == LLAMA


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

PRICES = parse({"llama": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                          "cache_read_input_token_cost": 2.5e-7}})


def test_cost_is_tokens_times_prices_in_nano_dollars():
    assert cost(PRICES, "llama", 1000, 500) == 1000 * 1000 + 500 * 2000  # 0.002 USD


def test_cached_prompt_tokens_are_charged_at_the_cached_price():
    # 600 uncached at 1000 nano-dollars, 400 cached at 250, 500 completion at 2000
    assert cost(PRICES, "llama", 1000, 500, cached_tokens=400) == 600 * 1000 + 400 * 250 + 500 * 2000
    assert cost(PRICES, "llama", 10, 0, cached_tokens=99) == 10 * 250     # at most the whole prompt
    assert cost(PRICES, "llama", 10, 0, cached_tokens=-5) == 10 * 1000


def test_without_a_cached_price_cached_tokens_cost_the_input_price():
    prices = parse({"m": {"input_cost_per_token": 1e-6}})
    assert cost(prices, "m", 100, 0, cached_tokens=100) == cost(prices, "m", 100, 0) == 100_000


@pytest.mark.parametrize("tokens, nanos", [
    (1, 19), (2, 38), (3, 56), (4, 75), (5, 94),  # 18.75 a token: .75 up, .5 up, .25 down
    (8, 150),
])
def test_a_requests_cost_is_rounded_once_half_up_to_the_nano_dollar(tokens, nanos):
    prices = parse({"m": {"input_cost_per_token": 1.875e-8}})
    assert cost(prices, "m", tokens, 0) == nanos
    assert Decimal(nanos) - Decimal("18.75") * tokens in (Decimal("0.25"), Decimal("0.5"), Decimal("-0.25"),
                                                         Decimal(0))


def test_a_million_requests_at_1_5e_7_a_token_add_up_exactly():
    """The float version summed 1.5e-07 × tokens with binary noise; integers cannot drift."""
    prices = parse('{"m": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}}')
    total = sum(cost(prices, "m", 1 + i % 97, i % 13) for i in range(1_000_000))
    prompt = sum(1 + i % 97 for i in range(1_000_000))
    completion = sum(i % 13 for i in range(1_000_000))
    exact = Decimal("1.5e-07") * prompt + Decimal("6e-07") * completion
    assert Decimal(total) / 10**9 == exact
    floats = 0.0
    for i in range(1000):
        floats += (1 + i % 97) * 1.5e-07
    assert floats != float(Decimal("1.5e-07") * sum(1 + i % 97 for i in range(1000)))  # what this replaced


def test_a_requests_cost_is_capped_at_a_million_dollars():
    assert cost(PRICES, "llama", 10**15, 10**15) == MAX_REQUEST_NANOS


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
