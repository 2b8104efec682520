"""A small HTTP/1.1 load generator: gevent greenlets on raw keep-alive sockets.

Run it as its own process so it gets its own share of the CPU (bench.run does):

    python -m bench.loadgen rps --url http://127.0.0.1:8000/v1/chat/completions \\
        --body '{"model":"fake-model","messages":[{"role":"user","content":"hi"}]}' \\
        -H 'Authorization: Bearer K' --concurrency 32 --duration 5
    python -m bench.loadgen streams --url ... --streams 500 -H 'x-fake-chunks: 20'

It prints one JSON object on stdout. Only loopback targets are accepted.

Why not `requests`/`http.client`: their per-request cost (header parsing through
`email.parser`, pools, hooks) is of the same order as a gevent server's, so the load generator
would become the bottleneck. Here a request is one prebuilt bytes object and a response is
parsed just enough to find its end: status code, Content-Length or chunked framing.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from urllib.parse import urlsplit

import gevent
from gevent import socket

RECV = 65536
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ProtocolError(Exception):
    """The server sent something this minimal parser does not accept."""


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (a thousand streams need the sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_request(host: str, port: int, path: str, body: bytes, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def connect(addr, timeout: float):
    sock = socket.create_connection(addr, timeout=timeout)
    # Request and body go out in one send, but Nagle would still delay a small request
    # behind the previous one's unacknowledged segment.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def parse_head(head: bytes):
    """(status, content_length or None, chunked, keep_alive) from a header block."""
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    status = int(head[9:12])
    lower = head.lower()
    length = None
    pos = lower.find(b"\r\ncontent-length:")
    if pos >= 0:
        end = lower.find(b"\r\n", pos + 2)
        length = int(lower[pos + 17:end if end >= 0 else len(lower)])
    chunked = False
    pos = lower.find(b"\r\ntransfer-encoding:")
    if pos >= 0:
        end = lower.find(b"\r\n", pos + 2)
        chunked = b"chunked" in lower[pos:end if end >= 0 else len(lower)]
    keep_alive = b"\r\nconnection: close" not in lower and head[5:8] == b"1.1"
    return status, length, chunked, keep_alive


class ChunkedDecoder:
    """Incremental `Transfer-Encoding: chunked` decoder; `feed` returns the payload bytes."""

    __slots__ = ("buf", "remaining", "done", "leftover")

    def __init__(self):
        self.buf = bytearray()
        self.remaining = -1  # -1: expecting a size line; -2: expecting the final CRLF/trailers
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        buf = self.buf
        buf += data
        out = []
        while not self.done:
            if self.remaining == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[:eol + 2]
                self.remaining = size if size else -2
            elif self.remaining == -2:
                if buf[:2] == b"\r\n":
                    cut = 2
                else:
                    cut = buf.find(b"\r\n\r\n")
                    if cut < 0:
                        break
                    cut += 4
                self.leftover = bytes(buf[cut:])
                del buf[:]
                self.done = True
            elif self.remaining > 0:
                if not buf:
                    break
                take = min(self.remaining, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
            else:  # the CRLF after a chunk's data
                if len(buf) < 2:
                    break
                del buf[:2]
                self.remaining = -1
        return b"".join(out)


class Connection:
    """One keep-alive connection with the bytes read past the last response."""

    __slots__ = ("sock", "buf")

    def __init__(self, addr, timeout):
        self.sock = connect(addr, timeout)
        self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def exchange(self, request: bytes):
        """Send one request, read its whole response; return (status, keep_alive)."""
        self.sock.sendall(request)
        recv = self.sock.recv
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            data = recv(RECV)
            if not data:
                raise ConnectionError("connection closed before the response head")
            buf += data
            end = buf.find(b"\r\n\r\n")
        status, length, chunked, keep_alive = parse_head(buf[:end])
        body_at = end + 4
        if length is not None and not chunked:
            need = body_at + length
            while len(buf) < need:
                data = recv(RECV)
                if not data:
                    raise ConnectionError("connection closed inside the body")
                buf += data
            self.buf = buf[need:]
        elif chunked:
            decoder = ChunkedDecoder()
            decoder.feed(buf[body_at:])
            while not decoder.done:
                data = recv(RECV)
                if not data:
                    raise ConnectionError("connection closed inside a chunked body")
                decoder.feed(data)
            self.buf = decoder.leftover
        else:  # body delimited by the end of the connection
            while recv(RECV):
                pass
            keep_alive = False
            self.buf = b""
        return status, keep_alive


def percentile(sorted_values, q: float):
    """Nearest-rank percentile of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def ms(value):
    return None if value is None else round(value * 1000.0, 3)


def run_fixed(addr, request: bytes, concurrency: int, duration: float | None, count: int | None,
              warmup: float, timeout: float) -> dict:
    """`concurrency` connections send requests back to back; latencies of the measured window.

    With `duration`, requests completing within [warmup, warmup + duration] count. With `count`,
    that many requests are measured after the warm-up (the run still stops after `timeout`).
    """
    state = {"issued": 0, "socket_errors": 0, "connects": 0}
    latencies = []
    statuses = {}
    error_samples = []
    begin = time.perf_counter()
    window_start = begin + warmup
    hard_stop = window_start + (duration if duration else timeout)
    marks = {}

    def worker():
        conn = None
        while True:
            now = time.perf_counter()
            if now >= hard_stop:
                break
            if count is not None and now >= window_start and state["issued"] >= count:
                break
            try:
                if conn is None:
                    state["connects"] += 1
                    conn = Connection(addr, timeout)
                if now >= window_start:
                    state["issued"] += 1
                t0 = time.perf_counter()
                status, keep_alive = conn.exchange(request)
                t1 = time.perf_counter()
                if window_start <= t1 <= hard_stop:
                    latencies.append(t1 - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                if not keep_alive:
                    conn.close()
                    conn = None
            except (OSError, ValueError, ProtocolError) as exc:
                if time.perf_counter() >= window_start:
                    state["socket_errors"] += 1
                    if len(error_samples) < 5:
                        error_samples.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                    conn = None
                gevent.sleep(0.01)  # do not spin on a refusing server
        if conn is not None:
            conn.close()

    def mark_window():
        gevent.sleep(max(0.0, window_start - time.perf_counter()))
        marks["cpu0"] = cpu_seconds()
        marks["t0"] = time.perf_counter()

    marker = gevent.spawn(mark_window)
    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    gevent.joinall(workers, timeout=warmup + (duration or timeout) + timeout + 5)
    gevent.killall([w for w in workers if not w.dead], block=True, timeout=2)
    marker.join(timeout=1)
    t_end = time.perf_counter()
    cpu_end = cpu_seconds()
    t0 = marks.get("t0", begin)
    window = min(t_end, hard_stop) - t0 if duration else t_end - t0
    latencies.sort()
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    http_errors = sum(n for code, n in statuses.items() if not 200 <= code < 300)
    return {
        "mode": "rps", "concurrency": concurrency, "window_s": round(window, 3),
        "requests": len(latencies), "ok": ok,
        "rps": round(len(latencies) / window, 1) if window > 0 else 0.0,
        "p50_ms": ms(percentile(latencies, 50)), "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)), "max_ms": ms(latencies[-1] if latencies else None),
        "errors": http_errors + state["socket_errors"], "http_errors": http_errors,
        "socket_errors": state["socket_errors"], "error_samples": error_samples,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connects": state["connects"],
        "loadgen_cpu_s": round(cpu_end - marks.get("cpu0", 0.0), 3),
        "loadgen_cpu_frac": round((cpu_end - marks.get("cpu0", 0.0)) / (t_end - t0), 3) if t_end > t0 else None,
    }


def one_stream(addr, request: bytes, t_launch: float, timeout: float) -> dict:
    """Open one connection, send the request, read the SSE body to its end."""
    rec = {"ok": False, "status": None, "ttfb": None, "first_data": None, "end": None,
           "reads": 0, "events": 0, "error": None}
    sock = None
    try:
        sock = connect(addr, timeout)
        sock.sendall(request)
        buf = b""
        end = -1
        while end < 0:
            data = sock.recv(RECV)
            if not data:
                raise ConnectionError("closed before the response head")
            if rec["ttfb"] is None:
                rec["ttfb"] = time.perf_counter() - t_launch
            buf += data
            end = buf.find(b"\r\n\r\n")
        status, length, chunked, _ = parse_head(buf[:end])
        rec["status"] = status
        decoder = ChunkedDecoder() if chunked else None
        received = 0
        last = b""
        data = buf[end + 4:]
        while True:
            payload = decoder.feed(data) if decoder else data
            if payload:
                if rec["first_data"] is None:
                    rec["first_data"] = time.perf_counter() - t_launch
                rec["reads"] += 1
                received += len(payload)
                # An event ends at a blank line; one may straddle two reads.
                rec["events"] += payload.count(b"\n\n") + (last == b"\n" and payload[:1] == b"\n")
                last = payload[-1:]
            if decoder is not None and decoder.done:
                break
            if length is not None and received >= length:
                break
            data = sock.recv(RECV)
            if not data:
                if decoder is None and length is None:
                    break  # body delimited by the end of the connection
                raise ConnectionError("closed inside the body")
        rec["end"] = time.perf_counter() - t_launch
        rec["ok"] = 200 <= status < 300
        if not rec["ok"]:
            rec["error"] = f"HTTP {status}"
    except (OSError, ValueError, ProtocolError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if sock is not None:
            sock.close()
    return rec


def run_streams(addr, request: bytes, streams: int, timeout: float) -> dict:
    """Open `streams` streams at once and follow each to its end (all bounded by `timeout`)."""
    cpu0 = cpu_seconds()
    t_launch = time.perf_counter()
    greenlets = [gevent.spawn(one_stream, addr, request, t_launch, timeout) for _ in range(streams)]
    gevent.joinall(greenlets, timeout=timeout)
    unfinished = [g for g in greenlets if not g.dead]
    gevent.killall(unfinished, block=True, timeout=2)
    wall = time.perf_counter() - t_launch
    cpu = cpu_seconds() - cpu0
    recs = [g.value for g in greenlets if g.successful() and g.value is not None]
    done = [r for r in recs if r["ok"]]
    ttfb = sorted(r["ttfb"] for r in recs if r["ttfb"] is not None)
    first = sorted(r["first_data"] for r in done if r["first_data"] is not None)
    reads = sorted(r["reads"] for r in done)
    events = sorted(r["events"] for r in done)
    merged = sum(1 for r in done if r["reads"] < r["events"])
    errors = [r["error"] for r in recs if r["error"]]
    return {
        "mode": "streams", "streams": streams, "completed": len(done),
        "all_completed": len(done) == streams,
        "errors": len(errors) + len(unfinished), "timed_out": len(unfinished),
        "error_samples": sorted(set(errors))[:5],
        "ttfb_p50_ms": ms(percentile(ttfb, 50)), "ttfb_p99_ms": ms(percentile(ttfb, 99)),
        "ttfb_max_ms": ms(ttfb[-1] if ttfb else None),
        "first_event_p50_ms": ms(percentile(first, 50)), "first_event_p99_ms": ms(percentile(first, 99)),
        "total_s": round(max((r["end"] for r in done), default=wall), 3),
        "wall_s": round(wall, 3),
        "events_per_stream_median": percentile(events, 50),
        "events_per_stream_min": events[0] if events else None,
        "reads_per_stream_median": percentile(reads, 50),
        "reads_per_stream_min": reads[0] if reads else None,
        "streams_with_merged_reads": merged,
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_frac": round(cpu / wall, 3) if wall > 0 else None,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["rps", "streams"])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/path (loopback only)")
    parser.add_argument("--body", default="{}", help="JSON request body")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=None, help="rps: measured seconds")
    parser.add_argument("--count", type=int, default=None, help="rps: measured requests (instead of --duration)")
    parser.add_argument("--warmup", type=float, default=1.0, help="rps: unmeasured seconds first")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="per socket operation; also bounds a --count run and a streams run")
    args = parser.parse_args(argv)
    if args.mode == "rps" and not args.duration and not args.count:
        args.duration = 5.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "http" or url.hostname not in LOOPBACK:
        print(f"loadgen: only http://127.0.0.1 targets are allowed, got {args.url}", file=sys.stderr)
        return 2
    raise_nofile_limit()
    addr = (url.hostname, url.port or 80)
    headers = []
    for raw in args.header:
        name, _, value = raw.partition(":")
        headers.append((name.strip(), value.strip()))
    request = build_request(url.hostname, addr[1], (url.path or "/") + (f"?{url.query}" if url.query else ""),
                            args.body.encode(), headers)
    if args.mode == "rps":
        result = run_fixed(addr, request, args.concurrency, None if args.count else args.duration,
                           args.count, args.warmup, args.timeout)
    else:
        result = run_streams(addr, request, args.streams, args.timeout)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
