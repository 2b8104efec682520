"""The fake vLLM's load model (fakevllm/engine.py): batch limit and queue, KV cache with
preemption, prefix cache, step timing, speed, data-parallel engines, and the /metrics series a
load-aware router reads. Off by default: the fake then stays instant.

The first tests drive one Engine by hand (no clock, fully deterministic); the rest start the
fake as a subprocess with load options and synchronise on /metrics polled with a deadline and
on the fake's own events; timings are compared as ratios with wide margins (a noisy machine).
"""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fakevllm.engine import ABORTED, FINISHED, RUNNING, WAITING, Engine, LoadConfig, generated_tokens
from fakevllm.payloads import load_metrics_text
from tests.conftest import FakeVLLM, wait_until

# ------------------------------------------------------------------ helpers


@pytest.fixture
def start_fake():
    """Factory: start fake vLLM subprocesses with extra args; all stopped after the test."""
    started = []

    def start(*args):
        fake = FakeVLLM(list(args))
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def metrics(fake) -> dict:
    """{sample name: {engine label or None: value}} from the fake's /metrics."""
    text = requests.get(fake.url + "/metrics", timeout=5).text
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("engine")] = sample.value
    return out


def total(m: dict, name: str) -> float:
    return sum(m[name].values())


def poll_metrics(fake, predicate, timeout=5.0):
    """Poll /metrics until predicate(metrics) holds; return those metrics or fail."""
    seen = {}

    def check():
        seen["m"] = metrics(fake)
        return predicate(seen["m"])

    assert wait_until(check, timeout), f"/metrics never matched; last: {seen.get('m')}"
    return seen["m"]


def idle(m: dict) -> bool:
    return (total(m, "vllm:num_requests_running") == 0 and total(m, "vllm:num_requests_waiting") == 0
            and total(m, "vllm:kv_cache_usage_perc") == 0)


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def expected_text(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


class Stream:
    """A chat completion stream in a thread: when its headers and first event came, its text."""

    def __init__(self, fake, tokens: int, content: str = "one two three", request_id: str | None = None,
                 extra_headers: dict | None = None):
        self.url = fake.url
        self.tokens = tokens
        self.content = content
        self.request_id = request_id or uuid.uuid4().hex
        self.extra_headers = extra_headers or {}
        self.headers_at = self.first_at = self.done_at = None
        self.text = ""
        self.error = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": self.content}],
                    "stream": True}
            headers = {"x-fake-chunks": str(self.tokens), "X-Request-Id": self.request_id, **self.extra_headers}
            with requests.post(self.url + "/v1/chat/completions", json=body, headers=headers,
                               stream=True, timeout=30) as resp:
                self.headers_at = time.monotonic() - self.started
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    if self.first_at is None:
                        self.first_at = time.monotonic() - self.started
                    if line == b"data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):  # not in an error event
                        self.text += choice["delta"].get("content", "")
            self.done_at = time.monotonic() - self.started
        except Exception as exc:  # reported by join()
            self.error = exc

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not finish"
        assert self.error is None, repr(self.error)
        return self


def chat(fake, content: str, tokens: int, **kw):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
    return requests.post(fake.url + "/v1/chat/completions", json=body,
                         headers={"x-fake-chunks": str(tokens)}, timeout=30, **kw)


def timed_chat(fake, content: str, tokens: int) -> float:
    start = time.monotonic()
    resp = chat(fake, content, tokens)
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == expected_text(tokens)
    return time.monotonic() - start


# ------------------------------------------------- the engine, stepped by hand


def engine(**settings) -> Engine:
    return Engine(LoadConfig(**settings), start=False)


def run_step(e: Engine) -> float:
    step = e.schedule()
    e.finish_step()
    return step


def test_preempted_request_goes_back_to_the_front_of_the_queue_and_recomputes():
    # 4 blocks of 4 tokens; two running requests of prompt 4 fill them once they need a 3rd block.
    e = engine(kv_blocks=4, block_size=4, max_running=2, prefill_ms_per_token=1,
               decode_ms_per_token=10, batch_growth=0)
    a, b, c = (e.submit([f"{name}{i}" for i in range(4)], 8) for name in "abc")
    assert run_step(e) == pytest.approx((10 + 8) / 1000)  # both prompts prefilled in step 1
    assert (a.state, b.state, c.state) == (RUNNING, RUNNING, WAITING)
    assert (a.generated, b.generated, a.blocks, b.blocks, e.free) == (1, 1, 2, 2, 0)
    for _ in range(3):
        run_step(e)
    assert a.generated == b.generated == 4 and e.preemptions == 0
    # a's 9th token needs a 3rd block: b (the latest admitted) is preempted, ahead of c in the queue
    run_step(e)
    assert e.preemptions == 1 and b.state == WAITING and b.blocks == 0
    assert list(e.waiting) == [b, c] and e.running == [a]
    assert (a.generated, a.blocks, e.free) == (5, 3, 1)
    assert b.generated == 4  # kept: it resumes where it was
    while a.state != FINISHED:
        run_step(e)
    assert e.free == 4 and a.blocks == 0
    # b resumes: its prompt is in the prefix cache up to the last token (3), plus 4 to recompute
    step = e.schedule()
    assert b.state == RUNNING and b.prefill == 1 + 4 and step == pytest.approx((10 + 5) / 1000)
    e.finish_step()
    while e.running or e.waiting:
        run_step(e)
    assert b.state == c.state == FINISHED and b.generated == c.generated == 8
    snap = e.snapshot()
    assert snap["counters"] == {"prompt_tokens": 12, "generation_tokens": 24, "requests": 3}
    assert (snap["running"], snap["waiting"], snap["kv_cache_usage"]) == (0, 0, 0.0)


def test_step_time_grows_with_the_batch_and_shrinks_with_speed():
    e = engine(decode_ms_per_token=10, batch_growth=0.5, prefill_ms_per_token=1, speed=0.5)
    for i in range(3):
        e.submit([f"p{i}-{j}" for j in range(4)], 5)
    # 3 running: 10 x (1 + 0.5 x 2) = 20 ms, + 12 prompt tokens x 1 ms; all doubled (speed 0.5)
    assert e.schedule() == pytest.approx((20 + 12) / 1000 / 0.5)
    e.finish_step()
    assert e.schedule() == pytest.approx(20 / 1000 / 0.5)


def test_prefix_cache_hits_leading_blocks_and_evicts_tail_blocks_first():
    e = engine(block_size=4, prefix_cache_blocks=2, prefill_ms_per_token=1, decode_ms_per_token=0)
    prompt = [f"w{i}" for i in range(12)]  # 3 full blocks
    first = e.submit(prompt, 1)
    assert run_step(e) == pytest.approx(12 / 1000) and first.state == FINISHED
    assert (e.queries, e.hits) == (12, 0)
    # Only 2 blocks fit: the tail block was evicted, the leading two still hit.
    again = e.submit(prompt[:8] + ["other"] * 4, 1)
    assert run_step(e) == pytest.approx(4 / 1000)
    assert again.prefill == 4 and (e.queries, e.hits) == (24, 8)
    e.reset_prefix_cache()
    e.submit(prompt, 1)
    assert run_step(e) == pytest.approx(12 / 1000) and e.hits == 8


def test_aborting_frees_the_slot_and_blocks_at_once():
    e = engine(max_running=1, kv_blocks=10)
    a, b = e.submit(["x"] * 20, 100), e.submit(["y"], 3)
    run_step(e)
    assert e.snapshot()["kv_cache_usage"] == 0.2 and list(e.waiting) == [b]
    e.abort(a)
    assert a.state == ABORTED and e.free == 10 and not e.running
    assert not e.wait_tokens(a, 2, timeout=0) and not e.wait_finished(a, timeout=0)
    while b.state != FINISHED:
        run_step(e)
    e.abort(b)  # finished already: nothing happens
    assert b.state == FINISHED and e.counters["requests"] == 1


def test_engine_series_parse_and_carry_an_engine_label_only_when_split():
    snaps = [engine().snapshot(), engine().snapshot()]
    for split, labels in ((True, {"0", "1"}), (False, {None})):
        text = load_metrics_text("m", snaps if split else snaps[:1], split).decode()
        names = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.add(sample.name)
                assert sample.labels["model_name"] == "m"
        assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total"} <= names
        engines = {s.labels.get("engine") for f in text_string_to_metric_families(text) for s in f.samples}
        assert engines == labels


# ----------------------------------------------------------- the fake, off


def test_without_load_options_the_fake_stays_instant_and_metrics_keep_their_shape(start_fake):
    fake = start_fake()
    session = requests.Session()
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "a b c"}]}
    session.post(fake.url + "/v1/chat/completions", json=body, timeout=5)  # warm-up
    times = []
    for stream in (False, True) * 5:
        start = time.monotonic()
        resp = session.post(fake.url + "/v1/chat/completions", json=dict(body, stream=stream),
                            headers={"x-fake-chunks": "50"}, timeout=5)
        assert resp.status_code == 200 and "tok49" in resp.text
        times.append(time.monotonic() - start)
    assert statistics.median(times) < 0.05, times
    m = metrics(fake)
    assert set(m) == {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                      "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                      "vllm:request_success_total"}
    assert all(list(series) == [None] for series in m.values())  # no engine label
    assert m["vllm:num_requests_waiting"][None] == 0 and m["vllm:kv_cache_usage_perc"][None] == 0


def test_an_invalid_load_option_is_refused_at_start():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "fakevllm", "--port", "0", "--speed", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--speed" in proc.stderr


# ------------------------------------------------------------ the fake, on


def test_batch_limit_holds_further_requests_in_the_waiting_queue(start_fake):
    fake = start_fake("--max-running", "2", "--decode-ms-per-token", "20")
    streams = [Stream(fake, 40) for _ in range(3)]
    m = poll_metrics(fake, lambda m: total(m, "vllm:num_requests_running") == 2
                     and total(m, "vllm:num_requests_waiting") == 1)
    assert list(m["vllm:num_requests_running"]) == [None]  # one engine: no engine label
    assert 0 < m["vllm:kv_cache_usage_perc"][None] < 1
    most_running = 0
    while any(s.thread.is_alive() for s in streams):
        most_running = max(most_running, total(metrics(fake), "vllm:num_requests_running"))
        time.sleep(0.02)
    assert most_running == 2
    for s in streams:
        assert s.join().text == expected_text(40)
    # The queued one started once a slot was free: about one request's time after the others.
    firsts = sorted(s.first_at for s in streams)
    assert firsts[2] > firsts[1] + 0.4, firsts
    m = poll_metrics(fake, idle)
    assert m["vllm:request_success_total"][None] == 3 and m["vllm:generation_tokens_total"][None] == 120
    assert m["vllm:prompt_tokens_total"][None] == 9


def test_time_to_first_token_grows_with_queue_position(start_fake):
    fake = start_fake("--max-running", "1", "--decode-ms-per-token", "10")
    streams = []
    for position in range(3):
        streams.append(Stream(fake, 20))  # about 200 ms each, one at a time
        poll_metrics(fake, lambda m, k=position + 1: total(m, "vllm:num_requests_running")
                     + total(m, "vllm:num_requests_waiting") == k)
    for s in streams:
        assert s.join().text == expected_text(20)
    ttft = [s.first_at for s in streams]
    assert ttft[0] < 0.15 and ttft[1] > ttft[0] + 0.1 and ttft[2] > ttft[1] + 0.1, ttft
    # vLLM sends a queued stream's headers at once; only the events wait.
    assert streams[2].headers_at < ttft[2] - 0.1, (streams[2].headers_at, ttft[2])


def test_a_finished_request_caches_what_it_generated_so_the_next_turn_hits_past_its_prompt():
    e = engine(block_size=4, prefill_ms_per_token=1, decode_ms_per_token=0)
    prompt = [f"w{i}" for i in range(6)]
    first = e.submit(prompt, 6)
    while first.state != FINISHED:
        run_step(e)
    # The next turn sends the answer back (the words the fake streamed), then a question:
    # prompt (6) + answer (6) = 3 full blocks cached; only one is prompt alone.
    follow = e.submit(prompt + generated_tokens(6) + ["q1", "q2"], 1)
    run_step(e)
    assert follow.prefill == 14 - 12 and e.hits == 12
    # A different answer in between shares only the prompt's one full block.
    other = e.submit(prompt + ["x"] * 6 + ["q1", "q2"], 1)
    run_step(e)
    assert other.prefill == 14 - 4


def test_a_repeated_long_prefix_gets_a_shorter_first_token_and_counts_hits(start_fake):
    fake = start_fake("--prefill-ms-per-token", "0.5", "--decode-ms-per-token", "5")
    system = words("sys", 384)  # 24 blocks of 16

    def ttft(question: str) -> float:
        body = {"model": "fake-model", "stream": True, "max_tokens": 2,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        start = time.monotonic()
        with requests.post(fake.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith(b"data: "))
            first = time.monotonic() - start
            assert b"data: [DONE]" in list(lines)
        return first

    cold = ttft(words("q", 16))  # 400 tokens to prefill: ~200 ms
    m = metrics(fake)
    assert (m["vllm:prefix_cache_queries_total"][None], m["vllm:prefix_cache_hits_total"][None]) == (400, 0)
    warm = ttft(words("other", 16))  # the 384-token system prompt is cached: 16 to prefill
    m = metrics(fake)
    assert (m["vllm:prefix_cache_queries_total"][None], m["vllm:prefix_cache_hits_total"][None]) == (800, 384)
    assert warm < cold / 3, (cold, warm)
    assert requests.post(fake.url + "/reset_prefix_cache", timeout=5).status_code == 200
    again = ttft(words("third", 16))
    assert again > warm * 3 and metrics(fake)["vllm:prefix_cache_hits_total"][None] == 384, (warm, again)


def test_a_small_kv_cache_preempts_yet_every_request_completes_in_full(start_fake):
    # 8 blocks x 16 = 128 tokens; four requests of 16 + 60 tokens (5 blocks each) cannot all run.
    fake = start_fake("--kv-blocks", "8", "--block-size", "16", "--max-running", "4",
                      "--decode-ms-per-token", "2")
    streams = [Stream(fake, 60, content=words(f"s{i}-", 16)) for i in range(2)]
    answers = {}

    def non_stream(i):
        answers[i] = chat(fake, words(f"n{i}-", 16), 60)

    threads = [threading.Thread(target=non_stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in streams:
        assert s.join().text == expected_text(60)
    for resp in answers.values():
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"] == expected_text(60)
        assert resp.json()["usage"]["completion_tokens"] == 60
    m = poll_metrics(fake, idle)
    assert m["vllm:num_preemptions_total"][None] >= 1
    assert m["vllm:request_success_total"][None] == 4 and m["vllm:generation_tokens_total"][None] == 240
    # A request that could not fit in the cache even alone is refused, as vLLM refuses it.
    refused = chat(fake, words("w", 100), 60)
    assert refused.status_code == 400 and "maximum context length is 128" in refused.json()["error"]["message"]


def test_half_speed_takes_about_twice_as_long(start_fake):
    full = start_fake("--decode-ms-per-token", "10")
    half = start_fake("--decode-ms-per-token", "10", "--speed", "0.5")
    fast, slow = [], []
    for _ in range(3):  # interleaved, medians: the machine is noisy
        fast.append(timed_chat(full, "a b c", 20))  # ~200 ms
        slow.append(timed_chat(half, "a b c", 20))  # ~400 ms
    ratio = statistics.median(slow) / statistics.median(fast)
    assert 1.5 < ratio < 3, (fast, slow)


def test_decode_steps_slow_down_as_the_batch_grows(start_fake):
    fake = start_fake("--decode-ms-per-token", "10", "--batch-growth", "0.5")
    alone = timed_chat(fake, "a b c", 20)  # 20 steps of 10 ms
    streams = [Stream(fake, 20) for _ in range(4)]  # 20 steps of 10 x (1 + 0.5 x 3) = 25 ms
    together = statistics.median(s.join().done_at for s in streams)
    assert 1.7 < together / alone < 4, (alone, together)


def test_two_engines_each_report_their_share_and_sum_to_the_totals(start_fake):
    fake = start_fake("--engines", "2", "--max-running", "1", "--decode-ms-per-token", "20")
    prompts = [words("a", 3), words("b", 5), words("c", 7), words("d", 11)]
    streams = []
    for i, prompt in enumerate(prompts):  # one at a time, so round-robin is predictable
        streams.append(Stream(fake, 30, content=prompt))
        poll_metrics(fake, lambda m, k=i + 1: total(m, "vllm:num_requests_running")
                     + total(m, "vllm:num_requests_waiting") == k)
    m = metrics(fake)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert m[name] == {"0": 1, "1": 1}, (name, m[name])
    assert all(set(series) == {"0", "1"} for series in m.values()), m  # every series is split
    for s in streams:
        assert s.join().text == expected_text(30)
    m = poll_metrics(fake, idle)
    # Engine 0 served the 1st and 3rd requests, engine 1 the 2nd and 4th.
    assert m["vllm:prompt_tokens_total"] == {"0": 3 + 7, "1": 5 + 11}
    assert m["vllm:request_success_total"] == {"0": 2, "1": 2}
    assert total(m, "vllm:generation_tokens_total") == 120
    assert total(m, "vllm:prefix_cache_queries_total") == 26


def test_a_disconnected_stream_frees_its_slot_for_the_next_request(start_fake):
    fake = start_fake("--max-running", "1", "--decode-ms-per-token", "10")
    gone_id = uuid.uuid4().hex
    resp = requests.post(fake.url + "/v1/chat/completions", stream=True, timeout=30,
                         json={"model": "fake-model", "stream": True,
                               "messages": [{"role": "user", "content": "long story"}]},
                         headers={"x-fake-chunks": "100000", "X-Request-Id": gone_id})
    chunks = resp.iter_content(chunk_size=None)
    assert next(chunks).startswith(b"data: ")
    queued = Stream(fake, 3)
    m = poll_metrics(fake, lambda m: total(m, "vllm:num_requests_waiting") == 1)
    assert m["vllm:num_requests_running"][None] == 1 and m["vllm:kv_cache_usage_perc"][None] > 0
    resp.close()
    status, _ = fake.wait_event("stream_closed_early", gone_id)
    assert status == 200
    assert queued.join().text == expected_text(3)
    m = poll_metrics(fake, idle)
    assert m["vllm:request_success_total"][None] == 1  # the aborted one is no success


def test_a_client_leaving_a_non_stream_request_frees_its_slot(start_fake):
    fake = start_fake("--max-running", "1", "--decode-ms-per-token", "10")
    gone_id = uuid.uuid4().hex
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x y"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
                 + f"x-fake-chunks: 100000\r\nX-Request-Id: {gone_id}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    poll_metrics(fake, lambda m: total(m, "vllm:num_requests_running") == 1)
    sock.close()
    status, event = fake.wait_event("request_aborted", gone_id)
    assert status == 200 and event["path"] == "/v1/chat/completions"
    poll_metrics(fake, idle)
    assert timed_chat(fake, "a", 2) < 1  # the slot is free again


def test_a_stream_the_fake_breaks_off_on_purpose_frees_its_slot_too(start_fake):
    # x-fake-stream-error-after ends the stream with an in-band error; the client keeps its
    # connection open (keep-alive), so only the end of the stream can free the slot.
    fake = start_fake("--max-running", "1", "--decode-ms-per-token", "10")
    with requests.Session() as session:
        resp = session.post(fake.url + "/v1/chat/completions", timeout=30,
                            json={"model": "fake-model", "stream": True,
                                  "messages": [{"role": "user", "content": "a b"}]},
                            headers={"x-fake-chunks": "100000", "x-fake-stream-error-after": "3"})
        assert resp.text.count("tok") == 3 and "fake error injected" in resp.text
        m = poll_metrics(fake, idle)
        assert m["vllm:request_success_total"][None] == 0
        # The same connection serves the next request.
        assert session.post(fake.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                            timeout=30).json()["choices"][0]["text"] == expected_text(2)
