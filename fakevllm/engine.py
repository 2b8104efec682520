"""An optional load model: the fake behaves like a vLLM engine under load.

Off by default (the fake then answers at once, as it always did).  Any load
option of ``python -m fakevllm`` (see ``--help``) switches it on; the options
not given take the defaults in ``LoadConfig.DEFAULTS``.

Each engine (``--engines K``, data-parallel vLLM: requests are spread over the
engines round-robin) has its own batch, waiting queue, KV cache and prefix
cache, and ONE loop (a thread; a greenlet under gevent's monkey patching) that
steps like vLLM's scheduler:

1. *Schedule.*  Every running request reserves the KV block for the token it
   produces this step; when none is free, the most recently admitted running
   request is preempted (its blocks freed, back to the FRONT of the waiting
   queue, counted in ``vllm:num_preemptions_total``) until one is free or the
   request preempted itself.  Unless something was preempted, requests are
   then admitted from the waiting queue in FIFO order while the batch has room
   (``--max-running``) and the head of the queue fits in the free blocks.  An
   admitted request looks its prompt up in the prefix cache; its uncached
   prompt tokens (plus the tokens it had generated, when it resumes after a
   preemption) are prefilled in this step.
2. *Run the step*: sleep ``decode_ms × (1 + batch_growth × (running − 1)) +
   prefill_ms × prefilled tokens``, all divided by ``--speed``.
3. *Finish the step*: every running request has one more token (a newly
   admitted one its first); requests with all their tokens finish and free
   their blocks; the handlers waiting on tokens are woken.

KV cache: ``--kv-blocks`` blocks of ``--block-size`` tokens; a running request
holds ceil((prompt + generated) / block size) blocks (running requests never
share blocks).  A request that could not fit even alone is refused (400, as
vLLM refuses one longer than its context).

Prefix cache: the prompt's tokens (the fake's usual words) are hashed per full
block, each hash chained to the previous one; when a request's prefill ends
its blocks' hashes enter an LRU of ``--prefix-cache-blocks`` entries (default
``--kv-blocks``; 0 turns it off), and when it finishes so do the full blocks of
its prompt followed by what it generated (``tok0 tok1 ...``, the words it
streams), as vLLM's automatic prefix caching keeps decoded blocks: a client
that sends the answer back in its next turn hits the cache up to there.  At admission the leading blocks found there
skip prefill (at least one prompt token is always computed, like vLLM);
``vllm:prefix_cache_queries_total`` counts the prompt tokens looked up and
``vllm:prefix_cache_hits_total`` those found.  The LRU evicts a prompt's tail
blocks before its leading ones (as vLLM frees them).

Counters per engine, as vLLM counts them: prompt tokens when a request is first
admitted, generation tokens as they are produced, successes when a request
finishes (an aborted one is not counted).

So a stream's first token arrives after its queue wait plus one step holding
its prefill, and each next token one step later.
"""

import collections
import itertools
import threading
import time
import traceback

__all__ = ["LoadConfig", "LoadModel", "Engine", "Seq", "block_hashes", "generated_tokens"]

WAITING, RUNNING, FINISHED, ABORTED = "waiting", "running", "finished", "aborted"
MAX_WAIT = 3600.0  # a handler gives up on its engine after this long (a wedged engine)


class LoadConfig:
    """The load model's settings (validated); unspecified ones take DEFAULTS."""

    DEFAULTS = {
        "max_running": 256,           # vLLM's max_num_seqs
        "kv_blocks": 8192,            # x block_size = 131072 tokens of KV cache
        "block_size": 16,
        "prefix_cache_blocks": None,  # None: as many as kv_blocks
        "prefill_ms_per_token": 0.1,
        "decode_ms_per_token": 10.0,
        "batch_growth": 0.05,
        "speed": 1.0,
        "engines": 1,
    }
    __slots__ = tuple(DEFAULTS)

    def __init__(self, **settings):
        unknown = set(settings) - set(self.DEFAULTS)
        if unknown:
            raise TypeError("unknown load settings: %s" % ", ".join(sorted(unknown)))
        for key, default in self.DEFAULTS.items():
            value = settings.get(key)
            setattr(self, key, default if value is None else value)
        if self.prefix_cache_blocks is None:
            self.prefix_cache_blocks = self.kv_blocks
        for key in ("max_running", "kv_blocks", "block_size", "engines"):
            if int(getattr(self, key)) < 1:
                raise ValueError("%s must be at least 1" % key)
        for key in ("prefix_cache_blocks", "prefill_ms_per_token", "decode_ms_per_token",
                    "batch_growth"):
            if getattr(self, key) < 0:
                raise ValueError("%s must not be negative" % key)
        if not self.speed > 0:
            raise ValueError("speed must be positive")

    @property
    def capacity(self):
        """KV cache capacity of one engine, in tokens."""
        return self.kv_blocks * self.block_size


def block_hashes(tokens, block_size):
    """Chained hashes of the full blocks of ``tokens`` (a block's hash covers its prefix)."""
    out = []
    h = None
    for i in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[i:i + block_size])))
        out.append(h)
    return out


def generated_tokens(n):
    """The tokens a request of ``n`` output tokens generates: the words the fake streams."""
    return ["tok%d" % i for i in range(n)]


def _blocks(tokens, block_size):
    return -(-tokens // block_size)


class Seq:
    """One request in an engine: ``n`` tokens to generate after ``prompt`` tokens."""

    __slots__ = ("engine", "prompt", "n", "tokens", "hashes", "generated", "blocks", "state",
                 "prefill", "fresh", "admitted")

    def __init__(self, engine, tokens, n, hashes):
        self.engine = engine
        self.prompt = len(tokens)
        self.n = n
        self.tokens = tokens
        self.hashes = hashes
        self.generated = 0
        self.blocks = 0
        self.state = WAITING
        self.prefill = 0      # tokens computed in the step that admitted it
        self.fresh = False    # admitted in the current step
        self.admitted = False  # ever (its prompt tokens were counted then)

    @property
    def active(self):
        return self.state in (WAITING, RUNNING)


class Engine:
    """One engine's batch, queue and caches, and the loop that steps them.

    ``schedule()`` and ``finish_step()`` are the two halves of a step; the loop
    calls them around its sleep (tests may call them directly with
    ``start=False``).  One lock guards everything.
    """

    def __init__(self, cfg, index=0, start=True):
        self.cfg = cfg
        self.index = index
        self.waiting = collections.deque()
        self.running = []  # in admission order
        self.free = cfg.kv_blocks
        self.cache = collections.OrderedDict()  # block hash -> None, LRU order
        self.preemptions = 0
        self.queries = 0
        self.hits = 0
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0}
        # threading primitives become gevent-aware under monkey.patch_all().
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)      # the loop waits for requests
        self._progress = threading.Condition(self._lock)  # handlers wait for tokens
        self._clock = 0.0
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="fake-engine-%d" % index,
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------- handler side

    def count(self, prompt, generated):
        """Token counters of a request served outside the model (e.g. audio)."""
        with self._lock:
            self._count(prompt, generated)

    def _count(self, prompt, generated):
        c = self.counters
        c["prompt_tokens"] += prompt
        c["generation_tokens"] += generated
        c["requests"] += 1

    def submit(self, tokens, n):
        """Queue a request of prompt ``tokens`` (a list) producing ``n`` tokens."""
        seq = Seq(self, list(tokens), n, block_hashes(tokens, self.cfg.block_size))
        with self._lock:
            self.waiting.append(seq)
            self._work.notify()
        return seq

    def abort(self, seq):
        """The client went away: drop the request and free its blocks (no-op once done)."""
        with self._lock:
            if seq.state == WAITING:
                self.waiting.remove(seq)
            elif seq.state == RUNNING:
                self.running.remove(seq)
                self._free(seq)
            else:
                return
            seq.state = ABORTED
            self._progress.notify_all()
            self._work.notify()

    def wait_tokens(self, seq, k, timeout=MAX_WAIT):
        """Block until ``seq`` has ``k`` tokens (or finished); False if it was aborted."""
        with self._lock:
            self._progress.wait_for(
                lambda: seq.generated >= k or not seq.active, timeout)
            return seq.state != ABORTED and (seq.generated >= k or seq.state == FINISHED)

    def wait_finished(self, seq, timeout=MAX_WAIT):
        """Block until ``seq`` finished; False if it was aborted (or the wait timed out)."""
        with self._lock:
            self._progress.wait_for(lambda: not seq.active, timeout)
            return seq.state == FINISHED

    def wait_aborted(self, seq, timeout):
        """Sleep up to ``timeout`` s; True (at once) if ``seq`` is aborted meanwhile."""
        with self._lock:
            return self._progress.wait_for(lambda: seq.state == ABORTED, timeout)

    def snapshot(self):
        with self._lock:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "kv_cache_usage": (self.cfg.kv_blocks - self.free) / self.cfg.kv_blocks,
                    "preemptions": self.preemptions, "prefix_queries": self.queries,
                    "prefix_hits": self.hits, "counters": dict(self.counters)}

    def reset_prefix_cache(self):
        with self._lock:
            self.cache.clear()

    # --------------------------------------------------------- the step

    def schedule(self):
        """First half of a step: preempt / admit; return the step's length in seconds."""
        with self._lock:
            return self._schedule()

    def finish_step(self):
        """Second half: every running request gets its next token."""
        with self._lock:
            self._finish_step()

    def _schedule(self):
        cfg = self.cfg
        bs = cfg.block_size
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = _blocks(seq.prompt + seq.generated + 1, bs) - seq.blocks
            while need > self.free:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.state != RUNNING:
                break  # it preempted itself, so it was the last one
            self.free -= need
            seq.blocks += need
            i += 1
        prefill = 0
        while not preempted and self.waiting and len(self.running) < cfg.max_running:
            seq = self.waiting[0]
            need = _blocks(seq.prompt + seq.generated + 1, bs)
            if need > self.free:
                break
            self.waiting.popleft()
            hit = self._lookup(seq)
            seq.prefill = seq.prompt - hit + seq.generated  # a resumed request recomputes
            seq.fresh = True
            seq.blocks = need
            self.free -= need
            seq.state = RUNNING
            self.running.append(seq)
            prefill += seq.prefill
            if not seq.admitted:
                seq.admitted = True
                self.counters["prompt_tokens"] += seq.prompt
        if not self.running:
            return 0.0
        ms = cfg.decode_ms_per_token * (1 + cfg.batch_growth * (len(self.running) - 1)) \
            + cfg.prefill_ms_per_token * prefill
        return ms / 1000.0 / cfg.speed

    def _finish_step(self):
        done = []
        counters = self.counters
        for seq in self.running:
            if seq.fresh:
                seq.fresh = False
                self._remember(seq)
            if seq.generated < seq.n:
                seq.generated += 1
                counters["generation_tokens"] += 1
            if seq.generated >= seq.n:
                done.append(seq)
        for seq in done:
            self.running.remove(seq)
            self._free(seq)
            self._remember(seq, generated_tokens(seq.n))
            seq.state = FINISHED
            counters["requests"] += 1
        self._progress.notify_all()

    def _free(self, seq):
        self.free += seq.blocks
        seq.blocks = 0

    def _preempt(self, seq):
        self._free(seq)
        seq.state = WAITING
        seq.fresh = False
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _lookup(self, seq):
        """Prompt tokens found in the prefix cache (leading blocks); counts the query."""
        cache = self.cache
        found = 0
        for h in seq.hashes:
            if h not in cache:
                break
            found += 1
        for h in reversed(seq.hashes[:found]):  # the first block ends up most recently used
            cache.move_to_end(h)
        hit = min(found * self.cfg.block_size, max(seq.prompt - 1, 0))
        self.queries += seq.prompt
        self.hits += hit
        return hit

    def _remember(self, seq, generated=None):
        """Cache the prompt's full blocks; with ``generated`` (at the end), those of the prompt
        followed by the generated tokens."""
        cap = self.cfg.prefix_cache_blocks
        if not cap:
            return
        cache = self.cache
        hashes = seq.hashes if generated is None else block_hashes(seq.tokens + generated, self.cfg.block_size)
        # Newest-first so that the tail blocks of a prompt are evicted first (as vLLM frees
        # them): a chained lookup can still hit the leading ones.
        for h in reversed(hashes):
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
        while len(cache) > cap:
            cache.popitem(last=False)

    # ---------------------------------------------------------- the loop

    def _run(self):
        while True:
            try:
                with self._lock:
                    while not self.running and not self.waiting:
                        self._work.wait()
                    step = self._schedule()
                self._sleep(step)
                with self._lock:
                    self._finish_step()
            except Exception:  # keep serving; fail what was in flight rather than hang it
                traceback.print_exc()
                with self._lock:
                    for seq in self.running + list(self.waiting):
                        self._free(seq)
                        seq.state = ABORTED
                    self.running = []
                    self.waiting.clear()
                    self._progress.notify_all()

    def _sleep(self, step):
        """Sleep until the step's end, keeping a steady cadence: a late wake-up is made up
        for in the next step (unless more than a step behind, e.g. after idling)."""
        now = time.monotonic()
        base = self._clock if now - self._clock < step else now
        self._clock = base + step
        time.sleep(max(self._clock - now, 0.0))


class LoadModel:
    """The engines of one fake server; requests go to them round-robin."""

    def __init__(self, cfg, start=True):
        self.cfg = cfg
        self.engines = [Engine(cfg, i, start) for i in range(cfg.engines)]
        self._next = itertools.count()

    @property
    def capacity(self):
        return self.cfg.capacity

    def pick(self):
        return self.engines[next(self._next) % len(self.engines)]

    def snapshots(self):
        return [e.snapshot() for e in self.engines]

    def reset_prefix_cache(self):
        for e in self.engines:
            e.reset_prefix_cache()
