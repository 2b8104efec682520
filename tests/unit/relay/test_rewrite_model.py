"""gateway.relay.bodyfields.rewrite_model: a key alias changes the model value's bytes only."""
import json

import pytest

from gateway.relay.bodyfields import SMALL_BODY, rewrite_model


@pytest.mark.parametrize("body, expected", [
    (b'{"model":"fast","messages":[{"model":"fast"}]}', b'{"model":"real","messages":[{"model":"fast"}]}'),
    (b'{ "n" : 1 ,\n "model" :  "fast" }', b'{ "n" : 1 ,\n "model" :  "real" }'),
    (b'{"a":"x\\",\\"model\\":","model":"fast"}', b'{"a":"x\\",\\"model\\":","model":"real"}'),
    (b'{"mod\\u0065l":"fast","model":"fast"}', b'{"mod\\u0065l":"real","model":"real"}'),  # duplicates: all
])
def test_only_the_top_level_model_value_changes(body, expected):
    assert rewrite_model(body, "real") == expected


@pytest.mark.parametrize("body", [b'{"model":5}', b'[{"model":"fast"}]', b'not json', b'{"other":"fast"}'])
def test_no_string_model_no_rewrite(body):
    assert rewrite_model(body, "real") is None


def test_a_large_body_keeps_every_value():
    body = b'{"prompt": "' + b"x" * SMALL_BODY + b'", "model": "fast", "n": [1, 2]}'
    out = rewrite_model(body, "real")
    assert json.loads(out) == {**json.loads(body), "model": "real"}
    assert b'"n":[1, 2]' in out  # values byte for byte; only whitespace between members goes


def test_the_new_name_is_json_quoted():
    assert json.loads(rewrite_model(b'{"model":"a"}', 'we"ird\u00e9')) == {"model": 'we"ird\u00e9'}
