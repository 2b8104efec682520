"""Reading usage from a copy of the response: JSON, SSE with and without a usage chunk."""
import gzip
import json

import pytest

from gateway.usage.tap import UsageTap

CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "m1",
         "choices": [{"index": 0, "delta": {"content": "hi "}, "finish_reason": None}]}


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def feed_in_pieces(tap, data: bytes, size: int):
    for i in range(0, len(data), size):
        tap.feed(data[i:i + size])


def test_json_usage():
    tap = UsageTap("application/json", "")
    tap.feed(json.dumps({"model": "m1", "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode())
    usage = tap.result({"model": "asked"})
    assert (usage.model, usage.prompt_tokens, usage.completion_tokens, usage.estimated) == ("m1", 7, 3, False)


def test_gzip_json_usage():
    tap = UsageTap("application/json", "gzip")
    tap.feed(gzip.compress(json.dumps({"model": "m1", "usage": {"prompt_tokens": 2, "completion_tokens": 9}}).encode()))
    usage = tap.result(None)
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 9)


def test_sse_with_usage_chunk_split_anywhere():
    first = {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    final = {"id": "c", "model": "m1", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}
    data = sse(first, CHUNK, CHUNK, final, b"[DONE]")
    for size in (1, 7, 64, len(data)):
        tap = UsageTap("text/event-stream; charset=utf-8", "")
        feed_in_pieces(tap, data, size)
        usage = tap.result(None)
        assert (usage.model, usage.prompt_tokens, usage.completion_tokens, usage.estimated) == ("m1", 11, 4, False)


def test_sse_without_usage_is_estimated():
    tap = UsageTap("text/event-stream", "")
    first = {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    tap.feed(sse(first, CHUNK, CHUNK, CHUNK, b"[DONE]"))
    usage = tap.result({"model": "asked", "messages": [{"role": "user", "content": "x" * 40}]})
    assert usage.estimated is True
    assert usage.completion_tokens == 3      # the empty role chunk carries no content
    assert usage.prompt_tokens == 14         # (40 characters + 16 for the chat template) / 4
    assert usage.model == "m1"


def test_responses_api_usage():
    tap = UsageTap("text/event-stream", "")
    tap.feed(b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"a"}\n\n'
             b'event: response.completed\ndata: {"type":"response.completed","response":{"model":"m2",'
             b'"usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}}\n\n')
    usage = tap.result(None)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (5, 6, False)


def test_stream_cut_short_still_counts():
    tap = UsageTap("text/event-stream", "")
    tap.feed(sse(CHUNK, CHUNK) + b"data: {\"partial")
    usage = tap.result({"model": "m1", "prompt": "abcd"})
    assert usage.completion_tokens == 2 and usage.prompt_tokens == 1 and usage.estimated


def test_non_json_body_counts_nothing():
    tap = UsageTap("text/plain", "")
    tap.feed(b"vllm:num_requests_running 0\n")
    usage = tap.result(None)
    assert usage.total_tokens == 0 and not usage.estimated


def _estimate(*events) -> int:
    tap = UsageTap("text/event-stream", "")
    tap.feed(sse(*events, b"[DONE]"))
    usage = tap.result(None)
    assert usage.estimated is True
    return usage.completion_tokens


def test_reasoning_deltas_are_counted():
    reasoning = {**CHUNK, "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
    also = {**CHUNK, "choices": [{"index": 0, "delta": {"reasoning": "so"}}]}
    assert _estimate(*[reasoning] * 1000, *[also] * 1000, CHUNK) == 2001


def test_tool_call_argument_deltas_are_counted():
    call = {**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"ci'}}]}}]}
    assert _estimate(*[call] * 500) == 500


def test_responses_api_reasoning_and_function_call_deltas_are_counted():
    events = [b'{"type":"response.reasoning_text.delta","delta":"th"}',
              b'{"type":"response.function_call_arguments.delta","delta":"{\\"a"}',
              b'{"type":"response.output_text.delta","delta":"ok"}']
    assert _estimate(*events * 100) == 300


def test_a_merged_delta_counts_a_token_per_four_characters():
    merged = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "x" * 400}}]}
    assert _estimate(merged) == 100


# -- cached prompt tokens (vLLM --enable-prompt-tokens-details) --------------------------------
CACHED_USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 8}}


def test_json_usage_reads_the_cached_prompt_tokens():
    tap = UsageTap("application/json", "")
    tap.feed(json.dumps({"model": "m1", "usage": CACHED_USAGE}).encode())
    usage = tap.result(None)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (12, 8, 3)


def test_a_stream_usage_chunk_reads_the_cached_prompt_tokens():
    final = {"id": "c", "model": "m1", "choices": [], "usage": CACHED_USAGE}
    for size in (1, 9, 4096):
        tap = UsageTap("text/event-stream", "")
        feed_in_pieces(tap, sse(CHUNK, final, b"[DONE]"), size)
        usage = tap.result(None)
        assert (usage.prompt_tokens, usage.cached_tokens) == (12, 8)


def test_responses_api_cached_input_tokens():
    tap = UsageTap("text/event-stream", "")
    tap.feed(b'event: response.completed\ndata: {"type":"response.completed","response":{"model":"m2",'
             b'"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens":6,'
             b'"output_tokens_details":{"reasoning_tokens":2},"total_tokens":15}}}\n\n')
    usage = tap.result(None)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (9, 4, 6)


@pytest.mark.parametrize("details, cached", [
    (None, 0),                                  # vLLM without --enable-prompt-tokens-details
    ({"cached_tokens": None}, 0), ({"cached_tokens": True}, 0), ({"cached_tokens": "8"}, 0),
    ({"cached_tokens": -3}, 0), ({"cached_tokens": 99}, 12),   # never more than the prompt
    ({}, 0), ("8", 0),
])
def test_odd_cached_token_figures_never_exceed_the_prompt(details, cached):
    tap = UsageTap("application/json", "")
    tap.feed(json.dumps({"usage": {**CACHED_USAGE, "prompt_tokens_details": details}}).encode())
    assert tap.result(None).cached_tokens == cached


def test_an_estimated_stream_has_no_cached_tokens():
    tap = UsageTap("text/event-stream", "")
    tap.feed(sse(CHUNK, b"[DONE]"))
    assert tap.result({"prompt": "abcd"}).cached_tokens == 0
