"""Route handlers for the vLLM API surface.

Each handler takes ``(app, req)`` and returns ``(status, headers, body)``
where body is bytes (sent with a Content-Length) or an SSE iterable made by
``app.stream`` (sent chunked).  Handlers never touch WSGI directly.
"""

import json
from urllib.parse import quote

from . import payloads as P
from . import sse
from .multipart import MultipartError, parse_form

JSON = [("Content-Type", "application/json")]
TEXT = [("Content-Type", "text/plain; charset=utf-8")]
METRICS = [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")]
EMPTY = (200, [], b"")


def json_resp(obj, code=200):
    return code, JSON, P.dumps(obj).encode()


def error(message, code, param=None, err_type=None):
    return code, JSON, P.error_body(message, code, param, err_type)


class BadRequest(Exception):
    """Carries a ready error response out of nested parsing helpers."""

    def __init__(self, response):
        super().__init__(response[2])
        self.response = response


def json_body(app, req):
    """Parse the JSON object body and check ``model``; raise BadRequest."""
    try:
        body = json.loads(req.body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise BadRequest(error("JSON decode error: %s" % exc, 400))
    if not isinstance(body, dict):
        raise BadRequest(error("Request body must be a JSON object", 400))
    check_model(app, body.get("model"))
    return body


def check_model(app, model):
    if model is not None and model != app.model:
        raise BadRequest(error("The model `%s` does not exist." % (model,), 404, "model",
                               "NotFoundError"))


def _limit(n, body, *keys):
    """Apply max_tokens-style limits: returns (n_tokens, finish_reason)."""
    for key in keys:
        cap = body.get(key)
        if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap < n:
            return cap, "length"
    return n, "stop"


def _stream_opts(body):
    opts = body.get("stream_options")
    if not isinstance(opts, dict):
        return False, False
    return bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))


def _req_id(req, prefix):
    return prefix + (req.rid if req.rid is not None else P.random_id())


# -------------------------------------------------------------- simple GETs

def health(app, req):
    return EMPTY


def version(app, req):
    return 200, JSON, b'{"version":"0.33.0-fake"}'


def load(app, req):
    # This request is itself in flight; vLLM counts only generation calls.
    return json_resp({"server_load": max(app.inflight - 1, 0)})


def metrics(app, req):
    if app.load is not None:
        return 200, METRICS, P.load_metrics_text(app.model, app.load.snapshots(),
                                                 len(app.load.engines) > 1)
    return 200, METRICS, P.metrics_text(app.model, max(app.inflight - 1, 0), app.counters)


def models(app, req):
    return 200, JSON, app.models_body


def operator(app, req):
    """Dev/operator routes: answer success so tests can see a gateway leak."""
    if req.path == "/reset_prefix_cache" and app.load is not None:
        app.load.reset_prefix_cache()
    return json_resp({"ok": True, "route": req.path})


def echo(app, req):
    return json_resp({"method": req.method, "path": req.raw_path, "query": req.query,
                      "headers": req.headers, "body_length": len(req.body)})


# ------------------------------------------------------------- tokenization

def tokenize(app, req):
    body = json_body(app, req)
    if isinstance(body.get("messages"), list):
        words = []
        for m in body["messages"]:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                c = " ".join(p.get("text", "") for p in c if isinstance(p, dict)
                             and isinstance(p.get("text"), str))
            if isinstance(c, str):
                words.extend(c.split())
    elif isinstance(body.get("prompt"), str):
        words = body["prompt"].split()
    else:
        return error("Either `prompt` (string) or `messages` (list) is required", 400)
    return json_resp({"count": len(words), "max_model_len": P.MAX_MODEL_LEN,
                      "tokens": [P.token_id(w) for w in words],
                      "token_strs": words if body.get("return_token_strs") else None})


def detokenize(app, req):
    body = json_body(app, req)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return error("`tokens` must be a list of integers", 400, "tokens")
    # Fake ids are hashes, so they cannot be inverted; name them instead.
    return json_resp({"prompt": " ".join("tok%d" % t for t in tokens)})


# -------------------------------------------------------------- generation

def chat(app, req, body=None):
    body = body if body is not None else json_body(app, req)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return error("`messages` is required and must be a list", 400, "messages")
    prompt = P.message_words(messages)
    n, finish = _limit(req.chunks, body, "max_completion_tokens", "max_tokens")
    refused = app.generate(req, prompt, n, lambda: P.message_tokens(messages))
    if refused is not None:
        return refused
    cid = _req_id(req, "chatcmpl-")
    if body.get("stream") is True:
        include_usage, continuous = _stream_opts(body)
        head, content, tail = sse.chat_events(cid, app.model, n, finish, prompt,
                                              include_usage, continuous)
        return app.stream(req, head, n, content, tail, sse.openai_error_tail())
    app.wait_generated(req)
    return json_resp(P.chat_completion(cid, app.model, n, prompt, finish))


def completions(app, req, body=None):
    body = body if body is not None else json_body(app, req)
    if "prompt" not in body:
        return error("`prompt` is required", 400, "prompt")
    prompt = P.prompt_words(body["prompt"])
    n, finish = _limit(req.chunks, body, "max_tokens")
    refused = app.generate(req, prompt, n, lambda: P.prompt_tokens(body["prompt"]))
    if refused is not None:
        return refused
    cid = _req_id(req, "cmpl-")
    if body.get("stream") is True:
        include_usage, _ = _stream_opts(body)
        head, content, tail = sse.completion_events(cid, app.model, n, finish, prompt,
                                                    include_usage)
        return app.stream(req, head, n, content, tail, sse.openai_error_tail())
    app.wait_generated(req)
    return json_resp(P.text_completion(cid, app.model, n, prompt, finish))


def invocations(app, req):
    """SageMaker-style entry point: dispatch on the body's shape like vLLM."""
    body = json_body(app, req)
    if "messages" in body:
        return chat(app, req, body)
    if "prompt" in body:
        return completions(app, req, body)
    return error("Cannot determine the request type from the body", 400)


def _input_words(inp):
    if isinstance(inp, list):
        return sum(P.content_words(i.get("content")) if isinstance(i, dict) else P.prompt_words(i)
                   for i in inp)
    return P.prompt_words(inp)


def _input_tokens(inp):
    if isinstance(inp, list):
        return [t for i in inp for t in (P.content_tokens(i.get("content"))
                                         if isinstance(i, dict) else P.prompt_tokens(i))]
    return P.prompt_tokens(inp)


def responses(app, req):
    body = json_body(app, req)
    if "input" not in body:
        return error("`input` is required", 400, "input")
    prompt = _input_words(body["input"])
    n = req.chunks
    cap = body.get("max_output_tokens")
    if isinstance(cap, int) and 0 <= cap < n:
        n = cap
    refused = app.generate(req, prompt, n, lambda: _input_tokens(body["input"]))
    if refused is not None:
        return refused
    rid = req.rid if req.rid is not None else P.random_id()
    done = P.response_object(rid, app.model, n, prompt)
    if body.get("stream") is True:
        head, content, tail, err = sse.response_events(
            P.response_object(rid, app.model, n, prompt, "in_progress"), done, n)
        return app.stream(req, head, n, content, tail, err)
    app.wait_generated(req)
    return json_resp(done)


def response_get(app, req):
    rid = req.path.rsplit("/", 1)[-1]
    rid = rid[len("resp_"):] if rid.startswith("resp_") else rid
    return json_resp(P.response_object(rid, app.model, req.chunks, 0))


def response_cancel(app, req):
    rid = req.path.split("/")[-2]
    rid = rid[len("resp_"):] if rid.startswith("resp_") else rid
    return json_resp(P.response_object(rid, app.model, 0, 0, "cancelled"))


def messages(app, req):
    """Anthropic-compatible /v1/messages."""
    body = json_body(app, req)
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return error("`messages` is required and must be a list", 400, "messages")
    prompt = P.message_words(msgs) + P.content_words(body.get("system"))
    n, finish = _limit(req.chunks, body, "max_tokens")
    refused = app.generate(req, prompt, n, lambda: P.content_tokens(body.get("system"))
                           + P.message_tokens(msgs))
    if refused is not None:
        return refused
    msg = P.anthropic_message(_req_id(req, "msg_"), app.model, n, prompt,
                              "max_tokens" if finish == "length" else "end_turn")
    if body.get("stream") is True:
        head, content, tail, err = sse.message_events(msg, n)
        return app.stream(req, head, n, content, tail, err)
    app.wait_generated(req)
    return json_resp(msg)


def embeddings(app, req):
    body = json_body(app, req)
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(t, int) for t in inp)):
        inputs = [inp]
    elif isinstance(inp, list) and inp:
        inputs = inp
    else:
        return error("`input` must be a non-empty string or list", 400, "input")
    return json_resp(P.embeddings(_req_id(req, "embd-"), app.model, inputs,
                                  body.get("encoding_format")))


def pooling_stub(app, req):
    """/pooling, /classify, /score, /rerank, /v2/embed ...: shape-only answer."""
    body = json_body(app, req)
    words = sum(P.prompt_words(body.get(k)) for k in ("input", "query", "text_1", "text_2",
                                                      "documents", "texts"))
    return json_resp({"id": _req_id(req, "pool-"), "object": "list",
                      "model": app.model, "data": [], "usage": P.usage(words, 0),
                      "route": req.path})


# ------------------------------------------------------------------- audio

def _field(fields, name):
    value = fields.get(name)
    return value[1].decode("utf-8", "replace") if value is not None else None


def audio(app, req):
    """/v1/audio/transcriptions and /translations (multipart/form-data)."""
    try:
        fields = parse_form(req.body, req.environ.get("CONTENT_TYPE", ""))
    except MultipartError as exc:
        return error("Invalid multipart/form-data body: %s" % exc, 400)
    if "file" not in fields:
        return error("Missing required form field `file`", 400, "file")
    model = _field(fields, "model")
    if model is None:
        return error("Missing required form field `model`", 400, "model")
    check_model(app, model)
    filename, data = fields["file"]
    size = len(data)
    n = req.chunks
    app.count_tokens(0, n)
    kind = "translation" if req.path.endswith("translations") else "transcription"
    if (_field(fields, "stream") or "").lower() == "true":
        usage = (_field(fields, "stream_include_usage") or "").lower() == "true"
        tid = _req_id(req, "trsc-" if kind == "transcription" else "trsl-")
        head, content, tail = sse.transcription_events(tid, app.model, kind + ".chunk", n,
                                                       max(1, size // 1024), usage)
        return app.stream(req, head, n, content, tail, sse.openai_error_tail())
    text = "fake %s of %d bytes (%s): %s" % (kind, size, quote(filename or "unnamed"),
                                              P.token_text(n).strip())
    if (_field(fields, "response_format") or "json") == "text":
        return 200, TEXT, text.encode()
    return json_resp({"text": text, "usage": {"type": "duration",
                                              "seconds": max(1, size // 32000)}})
