"""Which replica a request goes to: filter, score, affinity. Pure functions over `View`s, so the
rule can be read (and tested) apart from the I/O that feeds it.

The figures are vLLM's own (gateway/relay/loadpoller.py reads every replica's /metrics and shares
them through Redis); a View carries them only while they are fresh. The rule, in order:

1. Replicas cooling off after a failed connect are left out (tried last, soonest back first).
2. A healthy replica with fresh figures is *saturated* when
     - KV-cache use >= max_kv, or
     - waiting >= max_waiting, or vLLM is queueing already (waiting > 0) and waiting plus the
       requests this worker sent there since the figures were read reaches max_waiting (once
       vLLM queues, every request sent joins the queue), or
     - with a cap: running + waiting + sent since the figures - finished since the figures >= cap.
   Saturated replicas are left out while another replica can take the request.
3. The others are scored, lower is better:
     score = w_queue * (waiting + sent_since) + w_running * running / max(1, most running)
             + w_kv * kv_cache_usage
   `sent_since` (requests this worker sent there since the figures were read) spreads a burst
   between two polls; `most running` is the largest `running` among the healthy replicas with
   fresh figures, so that term is at most w_running. Ties go to the fewest in flight in this
   worker, then in turn.
4. Affinity: a request with a session key goes to the replica the key rendezvous-hashes to
   among the scored replicas, unless that replica's score exceeds the best score by more than
   `affinity_slack`; then to the best. The hashing is weighted by each replica's speed: its
   decode rate (generated tokens per second per running request, from vLLM's
   `vllm:generation_tokens_total` and `vllm:num_requests_running`, measured by the poller)
   relative to the fastest replica's, in steps of 0.1 so that small changes move no
   conversation; a replica half as fast holds about half as many conversations. A replica
   without a measured rate weighs as much as the fastest.
5. Fail open: a healthy replica without fresh figures is never refused for that; when no healthy
   replica has fresh figures the choice is the worker's least-in-flight, as without figures at
   all. Replicas without figures come after the scored ones (before the saturated ones) when
   only some have figures.

The order returned is the failover order: the request goes to the first; a replica refusing
the connection passes it to the next (gateway/relay/replicas.py).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

# Why a request went where it went (vgw_route_decisions_total's `reason`), a fixed set.
ROUTE_REASONS = (
    "score",                # best score among the replicas with fresh figures
    "affinity",             # the session's replica (rendezvous), within the slack of the best
    "affinity_overridden",  # the session's replica was much busier than the best: the best
    "fail_open",            # no usable figures for the replica chosen: least in flight
    "saturated",            # every healthy replica saturated (admission off, or let through)
    "cooling_off",          # every replica cooling off after failed connects: soonest back
    "sticky",               # a stateful Responses API call: the replica holding the response
    "single",               # one replica: nothing to choose
    "failover",             # the first choice refused the connection; a later one took it
    "round_robin",          # ROUTING_STRATEGY=round_robin: the worker's next replica in turn
)
SATURATION_REASONS = ("kv", "queue", "cap")


@dataclass(frozen=True)
class Policy:
    """The routing settings (gateway/core/config.py: ROUTING_*)."""

    w_queue: float = 1.0
    w_running: float = 1.0
    w_kv: float = 2.0
    max_waiting: int = 8
    max_kv: float = 0.95
    max_inflight: int = 0           # 0: no cap
    affinity: bool = True
    affinity_slack: float = 4.0
    affinity_prefix_bytes: int = 1024


@dataclass(slots=True)
class View:
    """One replica as the choice sees it. `figures` is None when none are fresh."""

    index: int                       # position in the configured list
    name: str
    healthy: bool = True
    down_until: float = 0.0
    inflight: int = 0                # this worker's requests in flight there
    figures: object | None = None    # loadpoller.Figures (waiting, running, kv: floats or None)
    sent_since: int = 0              # this worker's requests sent there since the figures' read
    done_since: int = 0              # this worker's requests there that ended since the read
    rotation: int = 0                # the in-turn tie-break (lower first)


def _numbers(figures) -> tuple[float, float, float]:
    """(waiting, running, kv) of fresh figures; a figure vLLM does not report counts as 0."""
    return (figures.waiting or 0.0, figures.running or 0.0, figures.kv or 0.0)


def _saturation(waiting: float, running: float, kv: float, sent: int, done: int, policy: Policy) -> str | None:
    if kv >= policy.max_kv:
        return "kv"
    if waiting >= policy.max_waiting or (waiting > 0 and waiting + sent >= policy.max_waiting):
        return "queue"
    if policy.max_inflight and running + waiting + sent - done >= policy.max_inflight:
        return "cap"
    return None


def saturation(view: View, policy: Policy) -> str | None:
    """Why a replica with fresh figures must not take more now ("kv", "queue", "cap"), or None."""
    if view.figures is None:
        return None
    return _saturation(*_numbers(view.figures), view.sent_since, view.done_since, policy)


def score(view: View, policy: Policy, running_ref: float) -> float:
    """The module's formula for a replica with fresh figures; `running_ref`: the most running."""
    return _score(*_numbers(view.figures), view.sent_since, policy, running_ref)


def _score(waiting, running, kv, sent, policy: Policy, running_ref: float) -> float:
    return policy.w_queue * (waiting + sent) + policy.w_running * running / max(1.0, running_ref) + policy.w_kv * kv


def rendezvous(key: str, names, weights: dict | None = None) -> str:
    """The name `key` hashes to among `names` (highest random weight): stable while the set is,
    and when a name leaves the set only the keys that hashed to it move. With `weights` (name ->
    positive weight; missing: 1), each name gets a share of the keys proportional to its weight
    (weighted rendezvous hashing: the highest weight / -ln(uniform hash) wins)."""
    def draw(name):
        return hashlib.blake2b(f"{key}|{name}".encode(), digest_size=8).digest()
    if not weights:
        return max(names, key=draw)

    def weighted(name):
        uniform = (int.from_bytes(draw(name), "big") + 0.5) / 2**64  # in (0, 1)
        return -weights.get(name, 1.0) / math.log(uniform)
    return max(names, key=weighted)


SPEED_STEP = 0.1  # weights move in these steps: a small change of measured speed moves nobody


def speed_weights(views) -> dict | None:
    """name -> each replica's decode rate relative to the fastest (SPEED_STEP steps, at least one
    step), for the replicas whose figures carry a rate; None when fewer than two differ."""
    rates = {v.name: getattr(v.figures, "decode_rate", None) for v in views if v.figures is not None}
    rates = {name: rate for name, rate in rates.items() if rate}
    if len(rates) < 2:
        return None
    fastest = max(rates.values())
    weights = {name: max(SPEED_STEP, round(round(rate / fastest / SPEED_STEP) * SPEED_STEP, 6))
               for name, rate in rates.items()}
    return weights if min(weights.values()) < 1.0 else None


@dataclass
class Decision:
    order: list          # Views, preference (and failover) order
    reason: str          # for the first
    scores: dict         # name -> score of the scored replicas


def choose(views: list, policy: Policy, session: str | None = None) -> Decision:
    """The failover order of `views` and why the first is first (see the module's rule)."""
    cooling, fresh, unknown = [], [], []
    running_ref = 1.0
    for view in views:
        if not view.healthy:
            cooling.append((view.down_until, view.index, view))
        elif view.figures is None:
            unknown.append((view.inflight, view.rotation, view.index, view))
        else:
            numbers = _numbers(view.figures)
            if numbers[1] > running_ref:
                running_ref = numbers[1]
            fresh.append((view, numbers))
    cooling = [entry[-1] for entry in sorted(cooling)] if cooling else cooling
    unknown = [entry[-1] for entry in sorted(unknown)] if unknown else unknown
    if not fresh:
        return Decision(unknown + cooling, "fail_open" if unknown else "cooling_off", {})
    scores, eligible, saturated = {}, [], []
    for view, (waiting, running, kv) in fresh:
        value = scores[view.name] = _score(waiting, running, kv, view.sent_since, policy, running_ref)
        entry = (value, view.inflight, view.rotation, view.index, view)
        if _saturation(waiting, running, kv, view.sent_since, view.done_since, policy):
            saturated.append(entry)
        else:
            eligible.append(entry)
    eligible = [entry[-1] for entry in sorted(eligible)]
    saturated = [entry[-1] for entry in sorted(saturated)] if saturated else saturated
    if not eligible:
        return Decision(unknown + saturated + cooling, "fail_open" if unknown else "saturated", scores)
    reason = "score"
    if session is not None and policy.affinity:
        best = target = eligible[0]
        if len(eligible) > 1:
            target_name = rendezvous(session, [v.name for v in eligible], speed_weights(eligible))
            target = next(v for v in eligible if v.name == target_name)
        if target is best or scores[target.name] - scores[best.name] <= policy.affinity_slack:
            if target is not best:
                eligible.remove(target)
                eligible.insert(0, target)
            reason = "affinity"
        else:
            reason = "affinity_overridden"
    return Decision(eligible + unknown + saturated + cooling, reason, scores)


def in_turn(views: list) -> list:
    """ROUTING_STRATEGY=round_robin: the healthy replicas in this worker's turn (`rotation`), then
    those cooling off, soonest back first. No figures, no affinity."""
    return sorted(views, key=lambda v: (not v.healthy, v.rotation if v.healthy else v.down_until, v.index))


def has_room(views: list, policy: Policy) -> bool:
    """False only when a request would pile onto saturated replicas: at least one replica is
    healthy and every healthy one has fresh figures saying it is saturated. Missing figures,
    or no healthy replica at all (the failover path then tries them), count as room: the gate
    fails open."""
    any_healthy = False
    for view in views:
        if view.healthy:
            if view.figures is None or saturation(view, policy) is None:
                return True
            any_healthy = True
    return not any_healthy


# -- the session key -------------------------------------------------------------------------

MAX_KEY_CHARS = 1024


def session_key(session_header: str | None, previous_response_id, end_user: str | None,
                prompt_head: bytes | None) -> str | None:
    """What ties a request to a conversation, first present wins: an `x-session-id` (or
    `x-conversation-id`) header, the body's `previous_response_id`, the end user
    (`x-end-user-id` or the body's `user`), else a digest of the start of the prompt
    (bodyfields.prompt_head). Each kind has its own namespace, so a session id never collides
    with a user of the same name."""
    if session_header:
        return "s:" + session_header[:MAX_KEY_CHARS]
    if isinstance(previous_response_id, str) and previous_response_id:
        return "r:" + previous_response_id[:MAX_KEY_CHARS]
    if end_user:
        return "u:" + end_user[:MAX_KEY_CHARS]
    if prompt_head:
        return "p:" + hashlib.blake2b(prompt_head, digest_size=16).hexdigest()
    return None
