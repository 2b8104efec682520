"""Tests for the fake vLLM server (fakevllm), run as a real subprocess.

Synchronisation never uses sleeps: we wait for the "listening" line and use
the server's own long-poll endpoint (/_fake/wait) for stream outcomes.
"""

import base64
import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import requests
import urllib3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fakevllm", "--port", "0", *args],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("fake vLLM listening on http://127.0.0.1:"), line
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        assert self.port > 0
        self.s = requests.Session()

    def get(self, path, **kw):
        return self.s.get(self.url + path, **kw)

    def post(self, path, **kw):
        return self.s.post(self.url + path, **kw)

    def wait(self, timeout=10, **match):
        params = dict(match, timeout=timeout)
        return requests.get(self.url + "/_fake/wait", params=params, timeout=timeout + 5)

    def stop(self, sig=signal.SIGTERM):
        self.s.close()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self.proc.stdout.close()
        return rc


@pytest.fixture(scope="module")
def srv():
    server = Server()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def keyed():
    server = Server("--api-key", "sekrit", "--model", "other-model")
    yield server
    assert server.stop(signal.SIGINT) == 0


def rid():
    return uuid.uuid4().hex


def sse_events(raw_chunks):
    """Check every HTTP chunk is exactly one SSE event; return the data fields."""
    out = []
    for chunk in raw_chunks:
        text = chunk.decode()
        assert text.endswith("\n\n") and text.count("\n\n") == 1, repr(text)
        out.append(text)
    return out


def stream_chunks(resp):
    # urllib3 yields one item per HTTP chunk from read_chunked().
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.headers
    return list(resp.raw.read_chunked())


CHAT = {"model": "fake-model", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": [
                                                {"type": "text", "text": "hello big world"}]}]}


# ----------------------------------------------------------- simple routes

def test_health_ping_version(srv):
    r = srv.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert srv.get("/ping").status_code == 200
    assert srv.post("/ping").status_code == 200
    assert srv.get("/version").json() == {"version": "0.33.0-fake"}


def test_load_metrics_models(srv):
    assert srv.get("/load").json() == {"server_load": 0}
    r = srv.get("/metrics")
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'vllm:num_requests_running{model_name="fake-model"} 0' in r.text
    body = srv.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model"]
    assert body["data"][0]["object"] == "model"


def test_head_is_get_without_body(srv):
    r = srv.s.head(srv.url + "/v1/models")
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["Content-Length"]) == len(srv.get("/v1/models").content)
    assert srv.s.head(srv.url + "/v1/chat/completions").status_code == 405


def test_tokenize_detokenize(srv):
    r = srv.post("/tokenize", json={"prompt": "a b  c"})
    body = r.json()
    assert body["count"] == 3 and len(body["tokens"]) == 3
    assert body["max_model_len"] == 4096 and body["token_strs"] is None
    assert all(isinstance(t, int) for t in body["tokens"])
    assert srv.post("/tokenize", json=CHAT).json()["count"] == 5
    assert srv.post("/detokenize", json={"tokens": [1, 2]}).json() == {"prompt": "tok1 tok2"}
    assert srv.post("/detokenize", json={"tokens": "x"}).status_code == 400


def test_unknown_route_and_method(srv):
    r = srv.get("/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = srv.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
    assert srv.post("/health").status_code == 405


@pytest.mark.parametrize("path", ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc",
                                  "/reset_prefix_cache", "/server_info", "/start_profile",
                                  "/stop_profile", "/pause", "/resume", "/update_weights",
                                  "/v1/load_lora_adapter", "/fault_tolerance/apply"])
def test_operator_routes_answer_ok(srv, path):
    r = srv.post(path, json={})
    assert r.status_code == 200 and r.json() == {"ok": True, "route": path}


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_echo_any_method(srv, method):
    r = srv.s.request(method, srv.url + "/echo/x/y?a=1&b=%20", data=b"12345",
                      headers={"X-Custom": "Val"})
    assert r.status_code == 200
    body = r.json()
    assert body["method"] == method and body["path"] == "/echo/x/y"
    assert body["query"] == "a=1&b=%20" and body["body_length"] == 5
    assert ["X-Custom", "Val"] in body["headers"]


# -------------------------------------------------------------- chat / completions

def test_chat_non_stream(srv):
    r = srv.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert int(r.headers["Content-Length"]) == len(r.content)
    body = r.json()
    assert body["id"] == "chatcmpl-abc-1" and body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert body["choices"][0]["finish_reason"] == "stop"
    u = body["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (5, 5, 10)


def test_chat_random_id_and_max_tokens(srv):
    a = srv.post("/v1/chat/completions", json=CHAT).json()["id"]
    b = srv.post("/v1/chat/completions", json=dict(CHAT, max_tokens=2)).json()
    assert a.startswith("chatcmpl-") and len(a) > 20 and a != b["id"]
    assert b["usage"]["completion_tokens"] == 2 and b["choices"][0]["finish_reason"] == "length"


def test_bad_json_and_unknown_model(srv):
    r = srv.post("/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] is None
    assert isinstance(err["message"], str)
    r = srv.post("/v1/completions", json={"model": "x", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model `x` does not exist.",
                                  "type": "NotFoundError", "param": "model", "code": 404}}


def test_chat_stream_format(srv):
    body = dict(CHAT, stream=True, stream_options={"include_usage": True})
    r = srv.post("/v1/chat/completions", json=body, stream=True, headers={"X-Request-Id": "s1"})
    assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = sse_events(stream_chunks(r))
    assert events[-1] == "data: [DONE]\n\n"
    objs = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(e.startswith("data: {") and ": " not in e[6:] for e in events[:-1])  # compact
    assert all(o["id"] == "chatcmpl-s1" and o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [o["choices"][0]["delta"]["content"] for o in objs[1:6]]
    assert content == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]
    assert objs[6]["choices"][0]["finish_reason"] == "stop"
    assert objs[7]["choices"] == []
    assert objs[7]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert len(objs) == 8


def test_chat_stream_without_usage_and_chunk_count(srv):
    r = srv.post("/v1/chat/completions", json=dict(CHAT, stream=True), stream=True,
                 headers={"x-fake-chunks": "2"})
    events = sse_events(stream_chunks(r))
    assert len(events) == 1 + 2 + 1 + 1
    assert all('"usage"' not in e for e in events)


def test_completions(srv):
    r = srv.post("/v1/completions", json={"prompt": "one two", "model": "fake-model"},
                 headers={"X-Request-Id": "c1"})
    body = r.json()
    assert body["id"] == "cmpl-c1" and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "
    assert body["usage"]["prompt_tokens"] == 2
    r = srv.post("/v1/completions", stream=True,
                 json={"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(stream_chunks(r))
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert [o["choices"][0]["text"] for o in objs[:5]] == ["tok%d " % i for i in range(5)]
    assert objs[5]["choices"][0]["finish_reason"] == "stop"
    assert objs[6]["usage"]["completion_tokens"] == 5 and events[-1] == "data: [DONE]\n\n"


def test_responses_api(srv):
    r = srv.post("/v1/responses", json={"input": "hi there", "model": "fake-model"})
    body = r.json()
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "
    assert body["usage"]["input_tokens"] == 2
    r = srv.post("/v1/responses", json={"input": "hi", "stream": True}, stream=True)
    events = sse_events(stream_chunks(r))
    kinds = [e.split("\n", 1)[0][len("event: "):] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    assert all("[DONE]" not in e for e in events)
    for e in events:
        head, data = e.rstrip("\n").split("\n")
        assert json.loads(data[len("data: "):])["type"] == head[len("event: "):]
    got = srv.get("/v1/responses/resp_abc")
    assert got.status_code == 200 and got.json()["id"] == "resp_abc"


def test_embeddings(srv):
    body = srv.post("/v1/embeddings", json={"input": ["a b", "c"]}).json()
    assert body["object"] == "list" and len(body["data"]) == 2
    assert body["data"][1]["index"] == 1 and len(body["data"][0]["embedding"]) == 8
    assert body["usage"]["prompt_tokens"] == 3


# -------------------------------------------------------------- audio

def test_transcription(srv):
    files = {"file": ("a.wav", b"x" * 1234, "audio/wav")}
    r = srv.post("/v1/audio/transcriptions", files=files, data={"model": "fake-model"})
    assert r.status_code == 200
    body = r.json()
    assert "1234 bytes" in body["text"] and "usage" in body
    r = srv.post("/v1/audio/transcriptions", files=files, stream=True,
                 data={"model": "fake-model", "stream": "true"})
    events = sse_events(stream_chunks(r))
    assert events[-1] == "data: [DONE]\n\n"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert [o["choices"][0]["delta"].get("content") for o in objs[:5]] == \
        ["tok%d " % i for i in range(5)]


def test_transcription_errors(srv):
    r = srv.post("/v1/audio/transcriptions", data=b"abc",
                 headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = srv.post("/v1/audio/transcriptions", data=b"garbage",
                 headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 400
    r = srv.post("/v1/audio/transcriptions", files={"model": (None, "fake-model")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = srv.post("/v1/audio/transcriptions", files={"file": ("a", b"1")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# -------------------------------------------------------------- control headers

def test_fake_status(srv):
    r = srv.post("/v1/chat/completions", json=CHAT, headers={"x-fake-status": "503"})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == 503 and err["type"] == "ServiceUnavailableError"


def test_fake_delay(srv):
    t0 = time.monotonic()
    r = srv.get("/health", headers={"x-fake-delay-ms": "200"})
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.2


def test_fake_gzip(srv):
    r = srv.post("/v1/chat/completions", json=CHAT, stream=True, headers={"x-fake-gzip": "1"})
    assert r.headers["Content-Encoding"] == "gzip"
    raw = r.raw.read(decode_content=False)
    assert len(raw) == int(r.headers["Content-Length"])
    assert json.loads(gzip.decompress(raw))["object"] == "chat.completion"


def test_fail_after_breaks_chunked_stream(srv):
    req_id = rid()
    r = srv.post("/v1/chat/completions", json=dict(CHAT, stream=True), stream=True,
                 headers={"x-fake-fail-after": "2", "X-Request-Id": req_id})
    got = []
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for chunk in r.raw.read_chunked():
            got.append(chunk)
    assert len(got) == 3  # role chunk + two content chunks, then nothing
    assert b"tok1 " in got[-1]
    ev = srv.wait(type="stream_aborted", request_id=req_id)
    assert ev.status_code == 200 and ev.json()["events_sent"] == 3
    # Seen through the requests API it is a ChunkedEncodingError.
    r = srv.post("/v1/completions", json={"prompt": "a", "stream": True}, stream=True,
                 headers={"x-fake-fail-after": "1"})
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = r.content


def test_stream_error_after(srv):
    r = srv.post("/v1/chat/completions", json=dict(CHAT, stream=True), stream=True,
                 headers={"x-fake-stream-error-after": "1"})
    assert r.status_code == 200
    events = sse_events(stream_chunks(r))
    assert len(events) == 4
    assert json.loads(events[2][6:])["error"]["code"] == 500
    assert events[3] == "data: [DONE]\n\n"


def test_hang_until_client_leaves(srv):
    req_id = rid()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(srv.url + "/v1/models", timeout=0.3,
                     headers={"x-fake-hang": "1", "X-Request-Id": req_id})
    ev = srv.wait(type="hang_ended", request_id=req_id).json()
    assert ev["reason"] == "client_gone"


# -------------------------------------------------------------- events / recording

def test_stream_completed_event(srv):
    req_id = rid()
    r = srv.post("/v1/completions", json={"prompt": "x", "stream": True},
                 headers={"X-Request-Id": req_id})
    assert r.text.endswith("data: [DONE]\n\n")
    ev = srv.wait(type="stream_completed", request_id=req_id, timeout=5).json()
    assert ev["events_sent"] == 7 and ev["path"] == "/v1/completions"


def test_disconnect_mid_stream_is_detected(srv):
    base = srv.get("/_fake/inflight").json()["inflight"]
    req_id = rid()
    r = requests.post(srv.url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                      stream=True, headers={"X-Request-Id": req_id, "x-fake-chunks": "100000",
                                            "x-fake-chunk-delay-ms": "5"})
    chunks = r.iter_content(chunk_size=None)  # keep a reference: GC would close it
    first = next(chunks)
    assert first.startswith(b"data: ")
    assert srv.get("/_fake/inflight").json()["inflight"] == base + 1
    assert srv.get("/load").json()["server_load"] == base + 1
    r.close()
    ev = srv.wait(type="stream_closed_early", request_id=req_id)
    assert ev.status_code == 200
    body = ev.json()
    assert body["path"] == "/v1/chat/completions" and 1 <= body["events_sent"] < 100000
    assert srv.get("/_fake/inflight").json()["inflight"] == base
    assert any(e.get("request_id") == req_id for e in srv.get("/_fake/events").json()["events"])


def test_wait_times_out(srv):
    r = srv.wait(type="stream_closed_early", request_id="never", timeout=0.2)
    assert r.status_code == 408 and r.json() == {"timeout": True}


def test_recording_raw_request(srv):
    assert srv.s.delete(srv.url + "/_fake/requests").status_code == 200
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    body = b"\x00\xffbinary"
    conn.request("PATCH", "/echo/a%2Fb/%7e?q=%41&x", body=body,
                 headers={"X-Request-Id": "rec-1", "x-MiXeD": "v"})
    assert conn.getresponse().read()
    conn.close()
    recs = srv.get("/_fake/requests").json()["requests"]
    assert len(recs) == 1
    rec = recs[0]
    assert rec["method"] == "PATCH" and rec["path"] == "/echo/a%2Fb/%7e"
    assert rec["query"] == "q=%41&x" and rec["request_id"] == "rec-1"
    assert base64.b64decode(rec["body_b64"]) == body
    assert ["x-MiXeD", "v"] in rec["headers"] and ["X-Request-Id", "rec-1"] in rec["headers"]
    assert srv.s.delete(srv.url + "/_fake/requests").status_code == 200
    assert srv.get("/_fake/requests").json()["requests"] == []
    assert srv.get("/_fake/events").json()["events"] == []


def test_chunked_upload_is_recorded(srv):
    req_id = rid()
    r = srv.post("/echo/up", data=iter([b"ab", b"cde"]), headers={"X-Request-Id": req_id})
    assert r.json()["body_length"] == 5
    rec = [x for x in srv.get("/_fake/requests").json()["requests"] if x["request_id"] == req_id]
    assert base64.b64decode(rec[0]["body_b64"]) == b"abcde"
    assert ["Transfer-Encoding", "chunked"] in rec[0]["headers"]


def test_messages_and_invocations(srv):
    r = srv.post("/v1/messages", json={"messages": [{"role": "user", "content": "a b"}],
                                       "stream": True}, stream=True)
    events = sse_events(stream_chunks(r))
    assert events[0].startswith("event: message_start\n")
    assert events[-1].startswith("event: message_stop\n")
    body = srv.post("/invocations", json=CHAT).json()
    assert body["object"] == "chat.completion"


def test_recording_keeps_last_1000(srv):
    for i in range(1005):
        srv.get("/health", params={"i": i})
    recs = srv.get("/_fake/requests").json()["requests"]
    assert len(recs) == 1000 and recs[-1]["query"] == "i=1004"


# -------------------------------------------------------------- api key

def test_api_key(keyed):
    r = keyed.get("/v1/models")
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = keyed.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "other-model"
    assert keyed.post("/v2/rerank", json={}).status_code == 401
    assert keyed.get("/inference/x").status_code == 401
    assert keyed.get("/cohere/x").status_code == 401
    # Everything outside those prefixes stays open, like vLLM.
    assert keyed.get("/health").status_code == 200
    assert keyed.post("/sleep").status_code == 200
    assert keyed.post("/tokenize", json={"prompt": "a"}).status_code == 200


# -------------------------------------------------------------- in-process

def test_in_process_wsgi_attributes():
    from fakevllm import make_app

    app = make_app(model="m")
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, dict(headers)

    import io
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "QUERY_STRING": "",
           "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
           "HTTP_X_REQUEST_ID": "ip", "wsgi.input": io.BytesIO(body)}
    it = app(env, start_response)
    chunks = list(it)
    it.close()
    assert seen["status"] == "200 OK" and chunks[-1] == b"data: [DONE]\n\n"
    assert app.recorded[0]["request_id"] == "ip"
    assert base64.b64decode(app.recorded[0]["body_b64"]) == body
    assert app.events[0]["type"] == "stream_completed" and app.events[0]["events_sent"] == 8
