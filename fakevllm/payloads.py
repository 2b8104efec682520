"""Pure builders for the JSON bodies and SSE events the fake server sends.

Nothing here touches WSGI or shared state, so it is easy to reason about and
cheap to call.  Shapes follow vLLM 0.33's OpenAI-compatible server; the text
generated is always ``"tok0 tok1 ..."`` so tests can predict it.
"""

import base64
import json
import os
import struct
import time
import zlib

# Compact separators and raw UTF-8 match vLLM (pydantic ``model_dump_json``).
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

DONE = b"data: [DONE]\n\n"
EMBED_DIM = 8
MAX_MODEL_LEN = 4096

# Error "type" names vLLM uses for common status codes.
_ERROR_TYPES = {
    400: "BadRequestError", 401: "UnauthorizedError", 403: "ForbiddenError",
    404: "NotFoundError", 405: "MethodNotAllowedError", 408: "TimeoutError",
    409: "ConflictError", 413: "PayloadTooLargeError", 422: "UnprocessableEntityError",
    429: "RateLimitError", 500: "InternalServerError", 501: "NotImplementedError",
    502: "BadGatewayError", 503: "ServiceUnavailableError", 504: "GatewayTimeoutError",
}


def error_type(code):
    return _ERROR_TYPES.get(code, "InternalServerError" if code >= 500 else "BadRequestError")


def error_dict(message, code, param=None, err_type=None):
    return {"error": {"message": message, "type": err_type or error_type(code),
                      "param": param, "code": code}}


def error_body(message, code, param=None, err_type=None):
    return dumps(error_dict(message, code, param, err_type)).encode()


def random_id():
    # os.urandom().hex() is cheaper than uuid4() and looks the same.
    return os.urandom(16).hex()


def token_text(n):
    """The whole generated text for ``n`` tokens (same as joined chunks)."""
    return "".join(["tok%d " % i for i in range(n)])


def usage(prompt, completion):
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}


# ---------------------------------------------------------------- counting

def words(text):
    return len(text.split()) if isinstance(text, str) else 0


def content_words(content):
    """Words in a chat message ``content`` (string or list of parts)."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(words(p.get("text")) for p in content if isinstance(p, dict))
    return 0


def message_words(messages):
    return sum(content_words(m.get("content")) for m in messages if isinstance(m, dict))


def prompt_words(prompt):
    """Token count of a completions ``prompt``: text, token ids, or lists of either."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):
            return len(prompt)
        return sum(prompt_words(p) for p in prompt)
    return 0


def word_list(text):
    return text.split() if isinstance(text, str) else []


def content_tokens(content):
    """The tokens (words) content_words() counts, in order."""
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):
        return [w for p in content if isinstance(p, dict) for w in word_list(p.get("text"))]
    return []


def message_tokens(messages):
    return [w for m in messages if isinstance(m, dict) for w in content_tokens(m.get("content"))]


def prompt_tokens(prompt):
    """The tokens prompt_words() counts: words, or the token ids themselves."""
    if isinstance(prompt, str):
        return prompt.split()
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):
            return list(prompt)
        return [t for p in prompt for t in prompt_tokens(p)]
    return []


def token_id(word):
    """Deterministic fake token id for a word (stable across runs)."""
    return zlib.crc32(word.encode("utf-8", "surrogatepass")) % 50000


# ---------------------------------------------------------------- non-stream

def chat_completion(cid, model, n_tokens, prompt_tokens, finish):
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": token_text(n_tokens), "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning_content": None},
            "logprobs": None, "finish_reason": finish, "stop_reason": None,
        }],
        "service_tier": None, "system_fingerprint": None,
        "usage": usage(prompt_tokens, n_tokens),
        "prompt_logprobs": None, "kv_transfer_params": None,
    }


def text_completion(cid, model, n_tokens, prompt_tokens, finish):
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": token_text(n_tokens), "logprobs": None,
                     "finish_reason": finish, "stop_reason": None, "prompt_logprobs": None}],
        "service_tier": None, "system_fingerprint": None,
        "usage": usage(prompt_tokens, n_tokens), "kv_transfer_params": None,
    }


def response_object(rid, model, n_tokens, input_tokens, status="completed"):
    """An OpenAI Responses API ``response`` object."""
    done = status == "completed"
    output = [{
        "id": "msg_" + rid, "type": "message", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": token_text(n_tokens),
                     "annotations": [], "logprobs": None}],
    }] if done else []
    return {
        "id": "resp_" + rid, "object": "response", "created_at": int(time.time()),
        "model": model, "status": status, "output": output, "error": None,
        "incomplete_details": None, "instructions": None, "metadata": None,
        "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": "auto", "tools": [], "max_output_tokens": None,
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": n_tokens if done else 0,
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": input_tokens + (n_tokens if done else 0)} if done else None,
    }


def anthropic_message(mid, model, n_tokens, input_tokens, stop_reason="end_turn"):
    return {
        "id": mid, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": token_text(n_tokens)}],
        "stop_reason": stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": n_tokens},
    }


def embedding_vector(text):
    """Deterministic unit-ish vector derived from the input's CRC."""
    seed = zlib.crc32(repr(text).encode("utf-8", "surrogatepass"))
    return [((seed >> (i * 4)) & 0xF) / 15.0 - 0.5 for i in range(EMBED_DIM)]


def embeddings(eid, model, inputs, encoding_format):
    data = []
    total = 0
    for i, item in enumerate(inputs):
        total += prompt_words(item)
        vec = embedding_vector(item)
        if encoding_format == "base64":
            vec = base64.b64encode(struct.pack("<%df" % len(vec), *vec)).decode()
        data.append({"index": i, "object": "embedding", "embedding": vec})
    return {"id": eid, "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": usage(total, 0)}


def models_list(model, created):
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "vllm",
        "root": model, "parent": None, "max_model_len": MAX_MODEL_LEN,
        "permission": [{
            "id": "modelperm-fake", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }]}


def metrics_text(model, running, counters):
    """Prometheus exposition text with a handful of vllm:* series."""
    lbl = '{model_name="%s"}' % model
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        "vllm:num_requests_running%s %d" % (lbl, running),
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        "vllm:num_requests_waiting%s 0" % lbl,
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        "vllm:kv_cache_usage_perc%s 0.0" % lbl,
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        "vllm:prompt_tokens_total%s %d" % (lbl, counters["prompt_tokens"]),
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        "vllm:generation_tokens_total%s %d" % (lbl, counters["generation_tokens"]),
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        'vllm:request_success_total{finished_reason="stop",model_name="%s"} %d'
        % (model, counters["requests"]),
    ]
    return ("\n".join(lines) + "\n").encode()


_LOAD_SERIES = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
     "running", "%d"),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
     "waiting", "%d"),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
     "kv_cache_usage", "%r"),
    ("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
     "preemptions", "%d"),
    ("vllm:prefix_cache_queries_total", "counter",
     "Prefix cache queries, in terms of number of queried tokens.", "prefix_queries", "%d"),
    ("vllm:prefix_cache_hits_total", "counter",
     "Prefix cache hits, in terms of number of cached tokens.", "prefix_hits", "%d"),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
     "prompt_tokens", "%d"),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
     "generation_tokens", "%d"),
)


def load_metrics_text(model, engines, engine_label):
    """Exposition text under the load model: one sample per engine (``engines`` are
    Engine.snapshot() dicts), labelled ``engine="i"`` when ``engine_label``."""
    labels = []
    for i in range(len(engines)):
        labels.append('engine="%d",model_name="%s"' % (i, model) if engine_label
                      else 'model_name="%s"' % model)
    lines = []
    for name, kind, help_text, key, fmt in _LOAD_SERIES:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s %s" % (name, kind))
        for lbl, snap in zip(labels, engines):
            value = snap[key] if key in snap else snap["counters"][key]
            lines.append(("%s{%s} " + fmt) % (name, lbl, value))
    lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    lines.append("# TYPE vllm:request_success_total counter")
    for i, snap in enumerate(engines):
        lines.append('vllm:request_success_total{%sfinished_reason="stop",model_name="%s"} %d'
                     % ('engine="%d",' % i if engine_label else "", model,
                        snap["counters"]["requests"]))
    return ("\n".join(lines) + "\n").encode()
