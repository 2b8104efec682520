"""Token usage read from a copy of vLLM's response, never delaying the bytes relayed.

Non-stream JSON: the `usage` object. SSE: the last non-null `usage` (sent when the request
asked for `stream_options.include_usage`, or in the Responses API's `response.completed`);
without one, the output is estimated and the result is marked `estimated`: every event that
carries output (visible text, reasoning, tool-call arguments) counts at least one token, and an
event whose text is longer than one token (vLLM merges deltas when the client reads slowly)
counts a token per 4 characters. For exact figures run vLLM with `--enable-force-include-usage`.

Prompt tokens vLLM served from its prefix cache are read too (`cached_tokens` in
`prompt_tokens_details`, or the Responses API's `input_tokens_details`; vLLM reports them when
started with `--enable-prompt-tokens-details`), so they can be charged at a cached price.
"""
from __future__ import annotations

import json
import re
import zlib

_MAX_KEPT = 4 * 1024 * 1024      # a non-stream body larger than this is parsed from its tail
_TAIL = 64 * 1024
_MAX_EVENT = 1024 * 1024         # an SSE event larger than this is skipped, not buffered forever
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
# An event that carries generated output: a non-empty `choices` array (chat, completions), or a
# Responses API delta (output text, reasoning, tool-call arguments, ...). Every such event counts,
# visible text or not: vLLM sends a token that ends inside a UTF-8 character with empty text.
_CHOICE = re.compile(rb'"choices"\s*:\s*\[\s*\{|"type"\s*:\s*"response\.[a-z_.]*delta"')
# The generated text an output event carries, whatever kind it is: chat `content`, vLLM's
# `reasoning_content`/`reasoning`, tool-call `arguments`, completions' `text`, Responses `delta`.
_OUTPUT_TEXT = re.compile(rb'"(?:content|reasoning_content|reasoning|arguments|text|delta|refusal)"'
                          rb'\s*:\s*"((?:[^"\\]|\\.)*)"')
_CHARS_PER_TOKEN = 4
# Choice events that carry no token: the first chat event, which only announces the role
# ({"role": "assistant", "content": ""}), and a closing event with an empty delta.
_NO_TOKEN = re.compile(rb'"delta"\s*:\s*\{\s*(?:\}|"role"\s*:\s*"[a-z]+"\s*(?:,\s*"content"\s*:\s*""\s*)?\})')
# Chat templates wrap each message in a few tokens (ChatML: <|im_start|>role\n ... <|im_end|>\n).
_TOKENS_PER_MESSAGE = 4


class Usage:
    """What one response used; `cached_tokens` are the part of the prompt served from vLLM's
    prefix cache (at most all of it)."""

    __slots__ = ("model", "prompt_tokens", "completion_tokens", "estimated", "cached_tokens")

    def __init__(self, model=None, prompt_tokens=0, completion_tokens=0, estimated=False, cached_tokens=0):
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.estimated = estimated
        self.cached_tokens = cached_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def clean_label(value):
    """A model name fit for logs, Redis and Prometheus labels: short, encodable text, else None."""
    if not isinstance(value, str) or not value or len(value) > 256:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _tokens(usage) -> tuple[int, int, int] | None:
    """(prompt, completion, cached prompt) from OpenAI-style or Responses-style usage objects."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if completion is None:
        total = usage.get("total_tokens")
        completion = total - prompt if isinstance(total, int) and isinstance(prompt, int) else 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    prompt = max(prompt, 0)
    return prompt, max(completion, 0), min(_cached_tokens(usage), prompt)


def _cached_tokens(usage: dict) -> int:
    """Prompt tokens served from the prefix cache: `prompt_tokens_details` (chat, completions)
    or `input_tokens_details` (Responses API); vLLM sends null there when it does not count them."""
    for name in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(name)
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0:
            return cached
    return 0


def _usage(model, tokens: tuple[int, int, int]) -> Usage:
    prompt, completion, cached = tokens
    return Usage(model, prompt, completion, cached_tokens=cached)


def _decoded(body: bytes, encoding: str) -> bytes | None:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            return zlib.decompress(body)
    except zlib.error:
        return None
    return None  # br, zstd, ...: not read


def estimate_prompt_tokens(fields: dict | None) -> int:
    """A rough count (4 characters a token) for when vLLM does not report usage."""
    if not fields:
        return 0
    if hasattr(fields, "prompt_chars"):  # a large body, measured while its fields were read
        return (fields.prompt_chars + 4 * _TOKENS_PER_MESSAGE * fields.message_count + 3) // 4
    chars = 0
    prompt = fields.get("prompt", fields.get("input"))
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) for p in prompt if isinstance(p, str))
    messages = fields.get("messages")
    if not isinstance(messages, list):
        messages = []
    for message in messages:
        chars += 4 * _TOKENS_PER_MESSAGE
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return (chars + 3) // 4


class UsageTap:
    """Fed each relayed chunk (after it was written); `result()` when the body ended."""

    def __init__(self, content_type: str, content_encoding: str):
        self.sse = content_type.startswith("text/event-stream")
        self.encoding = content_encoding.strip().lower()
        self.buffer = bytearray()
        self.size = 0
        self.model = None
        self.usage = None
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.sse:
            self._feed_sse(chunk)
        elif self.size <= _MAX_KEPT:
            self.buffer += chunk
        else:
            self.buffer = (self.buffer + chunk)[-_TAIL:]

    def _feed_sse(self, chunk: bytes) -> None:
        if self.encoding not in ("", "identity"):
            return
        self.buffer += chunk
        while True:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                if len(self.buffer) > _MAX_EVENT:
                    self.buffer.clear()
                return
            event = bytes(self.buffer[:end])
            del self.buffer[:end + 2]
            self._event(event)

    def _event(self, event: bytes) -> None:
        if self.model is None:
            match = _MODEL.search(event)
            if match:
                self.model = match.group(1).decode("utf-8", "replace")
        if b'"usage"' in event:
            match = _USAGE.search(event)
            if match:
                try:
                    tokens = _tokens(json.loads(match.group(1)))
                except (ValueError, RecursionError):
                    tokens = None
                if tokens is not None:
                    self.usage = tokens
        if _CHOICE.search(event) and not _NO_TOKEN.search(event):
            chars = sum(len(text) for text in _OUTPUT_TEXT.findall(event))
            self.events += max(1, chars // _CHARS_PER_TOKEN)

    def result(self, request_fields: dict | None) -> Usage:
        request_model = request_fields.get("model") if request_fields else None
        if self.sse:
            model = self.model or (request_model if isinstance(request_model, str) else None)
            if self.usage is not None:
                return _usage(model, self.usage)
            return Usage(model, estimate_prompt_tokens(request_fields), self.events, estimated=True)
        return self._json_result(request_model if isinstance(request_model, str) else None)

    def _json_result(self, request_model) -> Usage:
        body = bytes(self.buffer)
        if self.size <= _MAX_KEPT:
            body = _decoded(body, self.encoding)
            if body is None:
                return Usage(request_model, estimated=True)
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                payload = None
            if isinstance(payload, dict):
                tokens = _tokens(payload.get("usage"))
                model = payload.get("model") if isinstance(payload.get("model"), str) else request_model
                return _usage(model, tokens) if tokens else Usage(model)
        elif self.encoding in ("", "identity"):
            match = _USAGE.search(body)
            try:
                tokens = _tokens(json.loads(match.group(1))) if match else None
            except (ValueError, RecursionError):
                tokens = None
            if tokens:
                return _usage(request_model, tokens)
        return Usage(request_model)
