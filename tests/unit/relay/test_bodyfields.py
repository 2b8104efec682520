"""Top-level fields of large JSON bodies: the same answer as json.loads, without building it."""
import json
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.relay import bodyfields
from gateway.relay.bodyfields import LeanFields, top_level_fields
from gateway.usage.tap import _TOKENS_PER_MESSAGE, estimate_prompt_tokens


@pytest.fixture
def lean(monkeypatch):
    """Every body takes the large-body path."""
    monkeypatch.setattr(bodyfields, "SMALL_BODY", 0)


def lean_estimate(fields: LeanFields) -> int:
    return (fields.prompt_chars + 4 * _TOKENS_PER_MESSAGE * fields.message_count + 3) // 4


@pytest.mark.parametrize("body, expected", [
    (b'{"model": "allowed", "model": "other"}', {"model": "other"}),
    (b'{"mod\\u0065l": "escaped", "user": "u"}', {"model": "escaped", "user": "u"}),
    (b'{"model": "a", "mod\\u0065l": "b"}', {"model": "b"}),
    (b'{"model": ["m"], "previous_response_id": "r"}', {"model": None, "previous_response_id": "r"}),
    (b' {"model": "\\u00e9", "other": {"model": "nested"}}\n', {"model": "\u00e9"}),
], ids=["duplicate", "escaped-name", "escaped-duplicate", "container", "nested-and-unicode"])
def test_large_body_fields_match_json_loads(lean, body, expected):
    assert top_level_fields(body) == expected


@pytest.mark.parametrize("body", [b"[1]", b'"m"', b'{"model": "a"} x', b'{"model": "a",}', b"{", b"",
                                  b'{"model": NaN}', b'{"model": "\\ud800"}'])
def test_large_body_that_is_not_a_json_object_is_none(lean, body):
    assert top_level_fields(body) is None


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["model", "user", "text", "content", "role", "x"]), inner, max_size=4), max_leaves=20)
_message = st.one_of(_json, st.fixed_dictionaries({"content": st.one_of(st.text(max_size=20), st.lists(
    st.one_of(_json, st.fixed_dictionaries({"text": _json})), max_size=3))}))
_body = st.dictionaries(st.sampled_from(["model", "user", "previous_response_id", "prompt", "input", "messages", "a"]),
                        st.one_of(_json, st.lists(st.one_of(st.text(max_size=10), _scalars), max_size=4),
                                  st.lists(_message, max_size=4)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(_body, st.booleans())
def test_large_body_agrees_with_json_loads_and_the_estimate(body, duplicate):
    """Scalars as json.loads reads them; prompt characters as estimate_prompt_tokens counts."""
    text = json.dumps(body)
    if duplicate and body:  # prepend a decoy copy of every field: the later one must win
        text = "{" + json.dumps({k: "decoy" for k in body})[1:-1] + ", " + text[1:]
    raw = text.encode()
    bodyfields.SMALL_BODY, saved = 0, bodyfields.SMALL_BODY
    try:
        lean_fields = top_level_fields(raw)
    finally:
        bodyfields.SMALL_BODY = saved
    full = json.loads(raw)
    for name in bodyfields.SCALARS:
        value = full.get(name)
        assert lean_fields.get(name) == (None if isinstance(value, (dict, list)) else value)
    assert lean_estimate(lean_fields) == estimate_prompt_tokens(full)


def test_small_body_keeps_every_field():
    assert top_level_fields(b'{"model": "m", "messages": [{"role": "user"}]}') == {
        "model": "m", "messages": [{"role": "user"}]}


def test_huge_prompt_lists_are_sized_by_their_bytes_never_under_counted(lean):
    body = json.dumps({"prompt": ["ab"] * (bodyfields.MAX_COUNTED_ELEMENTS + 1)}).encode()
    assert top_level_fields(body).prompt_chars >= 2 * (bodyfields.MAX_COUNTED_ELEMENTS + 1)


def test_60_mib_of_empty_objects_peaks_under_twice_its_size_and_is_quick():
    """The issue's body: `{"a":[{},{},...],"model":"m"}`, 60 MiB; peak RSS growth while reading
    its fields (in a fresh process) and the time taken."""
    script = textwrap.dedent("""
        import json, resource, time
        from gateway.relay.bodyfields import top_level_fields
        body = b'{"a":[' + b'{},' * (60 * 2**20 // 3) + b'{}],"model":"m"}'
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        started = time.perf_counter()
        fields = top_level_fields(body)
        took = time.perf_counter() - started
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(json.dumps({"model": fields["model"], "grown": grown, "size": len(body), "took": took}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["model"] == "m"
    assert result["grown"] <= 2 * result["size"]
    assert result["took"] < 2
