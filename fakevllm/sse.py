"""Server-sent-event streams: event builders, the pacing driver, and the
WSGI iterable that records how a stream ended.

Each event is returned as its own bytes object and the WSGI server writes it
as its own HTTP chunk; nothing is ever merged, because a gateway test may
want to check that events are forwarded one at a time.

Hot-path note: content events are produced from a bytes ``%`` template built
once per stream, so a long stream costs one small format per token.
"""

import errno
import time

from .payloads import DONE, dumps, error_dict

__all__ = ["FakeAbort", "SSEStream", "drive", "chat_events", "completion_events",
           "transcription_events", "response_events", "message_events"]


class FakeAbort(ConnectionResetError):
    """Raised to kill a stream on purpose (x-fake-fail-after).

    It is a ConnectionResetError with errno ECONNRESET because gevent.pywsgi
    treats exactly that as "client went away": it drops the connection
    without a traceback and without the terminating zero-length chunk, so the
    client sees a broken chunked body rather than a clean end.
    """

    def __init__(self):
        super().__init__(errno.ECONNRESET, "x-fake-fail-after: aborting stream")


class ClientGone(Exception):
    """Raised by a pause that noticed the client hang up."""


def drive(head, n, content, tail, delay=0.0, fail_after=None, error_after=None,
          error_tail=(), sleep=time.sleep):
    """Yield ``head`` events, ``content(i)`` for i < n, then ``tail`` events.

    ``delay`` seconds are slept between events (not before the first, so the
    status line goes out promptly).  ``fail_after``/``error_after`` act once
    that many content events have been produced.  ``sleep`` may raise
    ClientGone to end the stream early (the caller watched the socket).
    """
    first = True
    for ev in head:
        if delay and not first:
            sleep(delay)
        first = False
        yield ev
    for i in range(n + 1):
        if i == fail_after:
            raise FakeAbort()
        if i == error_after:
            # vLLM reports errors after the stream began in-band, status 200.
            for ev in error_tail:
                yield ev
            return
        if i == n:
            break
        if delay and not first:
            sleep(delay)
        first = False
        yield content(i)
    for ev in tail:
        if delay:
            sleep(delay)
        yield ev


class SSEStream:
    """WSGI response iterable that reports how the stream ended.

    ``on_close(kind, events_sent)`` is called exactly once, from ``close()``
    (which every WSGI server calls, also after a failed write), with kind
    ``stream_completed``, ``stream_aborted`` (x-fake-fail-after) or
    ``stream_closed_early`` (client went away).  A class rather than a bare
    generator so that close() runs even if iteration never started.

    events_sent: the server asks for event k+1 only after event k was
    written, so (number of __next__ calls - 1) events reached the socket.
    """

    __slots__ = ("_it", "_calls", "_kind", "_on_close")

    def __init__(self, it, on_close):
        self._it = it
        self._calls = 0
        self._kind = "stream_closed_early"
        self._on_close = on_close

    def __iter__(self):
        return self

    def __next__(self):
        self._calls += 1
        try:
            return next(self._it)
        except StopIteration:
            self._kind = "stream_completed"
            raise
        except FakeAbort:
            self._kind = "stream_aborted"
            raise
        except ClientGone:
            raise StopIteration from None  # kind stays stream_closed_early

    def close(self):
        cb, self._on_close = self._on_close, None
        if cb is None:
            return
        self._it.close()
        cb(self._kind, max(self._calls - 1, 0))


# ------------------------------------------------------------ event builders

def _tpl(s):
    """Encode a %-template whose literal parts may contain user text."""
    return s.encode()


def _esc(s):
    # Literal text (ids, model names) embedded in a %-template.
    return s.replace("%", "%%")


def _data(obj):
    return b"data: " + dumps(obj).encode() + b"\n\n"


def _event(kind, obj):
    return b"event: " + kind.encode() + b"\ndata: " + dumps(obj).encode() + b"\n\n"


def openai_error_tail():
    err = error_dict("fake error injected by x-fake-stream-error-after", 500)
    return [_data(err), DONE]


def _usage(p, c):
    return {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}


def chat_events(cid, model, n, finish, prompt_tokens, include_usage, continuous):
    """(head, content, tail) for a chat.completion.chunk stream."""
    created = int(time.time())
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta, finish_reason=None, done=0, stop=False):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if stop:
            choice["stop_reason"] = None
        obj = dict(base, choices=[choice])
        if continuous:
            obj["usage"] = _usage(prompt_tokens, done)
        return _data(obj)

    head = [chunk({"role": "assistant", "content": ""})]
    if continuous:
        def content(i):
            return chunk({"content": "tok%d " % i}, done=i + 1)
    else:
        pre = dumps(base)[:-1]  # drop the closing brace, choices follow
        tpl = _tpl("data: " + _esc(pre) + ',"choices":[{"index":0,"delta":{"content":"tok%d "},'
                   '"logprobs":null,"finish_reason":null}]}\n\n')
        content = tpl.__mod__
    tail = [chunk({}, finish, done=n, stop=True)]
    if include_usage:
        tail.append(_data(dict(base, choices=[], usage=_usage(prompt_tokens, n))))
    tail.append(DONE)
    return head, content, tail


def completion_events(cid, model, n, finish, prompt_tokens, include_usage):
    created = int(time.time())
    base = {"id": cid, "object": "text_completion", "created": created, "model": model}
    pre = dumps(base)[:-1]
    tpl = _tpl("data: " + _esc(pre) + ',"choices":[{"index":0,"text":"tok%d ","logprobs":null,'
               '"finish_reason":null,"stop_reason":null}]}\n\n')
    tail = [_data(dict(base, choices=[{"index": 0, "text": "", "logprobs": None,
                                       "finish_reason": finish, "stop_reason": None}]))]
    if include_usage:
        tail.append(_data(dict(base, choices=[], usage=_usage(prompt_tokens, n))))
    tail.append(DONE)
    return [], tpl.__mod__, tail


def transcription_events(tid, model, obj_name, n, prompt_tokens, include_usage):
    base = {"id": tid, "object": obj_name, "created": int(time.time()), "model": model}
    pre = dumps(base)[:-1]
    tpl = _tpl("data: " + _esc(pre) + ',"choices":[{"delta":{"content":"tok%d "},'
               '"finish_reason":null,"stop_reason":null}]}\n\n')
    tail = [_data(dict(base, choices=[{"delta": {}, "finish_reason": "stop",
                                       "stop_reason": None}]))]
    if include_usage:
        tail.append(_data(dict(base, choices=[], usage=_usage(prompt_tokens, n))))
    tail.append(DONE)
    return [], tpl.__mod__, tail


def response_events(resp_in_progress, resp_done, n):
    """Responses API stream: ``event: <type>`` + ``data:``; no [DONE]."""
    rid = resp_done["id"]
    item_id = "msg_" + rid[len("resp_"):]
    text = resp_done["output"][0]["content"][0]["text"] if resp_done["output"] else ""
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": None}
    item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
            "content": []}
    head = [
        _event("response.created", {"type": "response.created", "sequence_number": 0,
                                     "response": resp_in_progress}),
        _event("response.in_progress", {"type": "response.in_progress", "sequence_number": 1,
                                         "response": resp_in_progress}),
        _event("response.output_item.added", {"type": "response.output_item.added",
                                               "sequence_number": 2, "output_index": 0,
                                               "item": item}),
        _event("response.content_part.added", {"type": "response.content_part.added",
                                                "sequence_number": 3, "item_id": item_id,
                                                "output_index": 0, "content_index": 0,
                                                "part": part}),
    ]
    tpl = _tpl('event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
               '"sequence_number":%d,"item_id":"' + _esc(item_id) + '","output_index":0,'
               '"content_index":0,"delta":"tok%d ","logprobs":[]}\n\n')

    def content(i):
        return tpl % (4 + i, i)

    seq = 4 + n
    done_part = dict(part, text=text)
    tail = [
        _event("response.output_text.done", {"type": "response.output_text.done",
                                              "sequence_number": seq, "item_id": item_id,
                                              "output_index": 0, "content_index": 0,
                                              "text": text, "logprobs": []}),
        _event("response.content_part.done", {"type": "response.content_part.done",
                                               "sequence_number": seq + 1, "item_id": item_id,
                                               "output_index": 0, "content_index": 0,
                                               "part": done_part}),
        _event("response.output_item.done", {"type": "response.output_item.done",
                                              "sequence_number": seq + 2, "output_index": 0,
                                              "item": resp_done["output"][0] if resp_done["output"] else item}),
        _event("response.completed", {"type": "response.completed", "sequence_number": seq + 3,
                                       "response": resp_done}),
    ]
    error_tail = [_event("error", {"type": "error", "code": "500", "param": None,
                                   "message": "fake error injected by x-fake-stream-error-after"})]
    return head, content, tail, error_tail


def message_events(msg_done, n):
    """Anthropic /v1/messages stream."""
    start = dict(msg_done, content=[], stop_reason=None,
                 usage=dict(msg_done["usage"], output_tokens=0))
    head = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
    ]
    tpl = _tpl('event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
               '"delta":{"type":"text_delta","text":"tok%d "}}\n\n')
    tail = [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": msg_done["stop_reason"],
                                           "stop_sequence": None},
                                 "usage": {"output_tokens": n}}),
        _event("message_stop", {"type": "message_stop"}),
    ]
    error_tail = [_event("error", {"type": "error", "error": {
        "type": "api_error", "message": "fake error injected by x-fake-stream-error-after"}})]
    return head, tpl.__mod__, tail, error_tail
