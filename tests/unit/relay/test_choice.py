"""The replica choice (gateway/relay/choice.py): filter, score, affinity, fail open; the session
key and the prompt head it may come from (gateway/relay/bodyfields.py prompt_head)."""
import json
from types import SimpleNamespace

import pytest

from gateway.relay import choice
from gateway.relay.bodyfields import SMALL_BODY, body_fields, prompt_head
from gateway.relay.choice import Policy, View, choose, has_room, rendezvous, saturation, session_key
from gateway.relay.loadpoller import Figures

POLICY = Policy()  # the defaults: w_queue 1, w_running 1, w_kv 2, max_waiting 8, max_kv 0.95, slack 4


def figures(waiting=0, running=0, kv=0.0):
    return Figures(waiting, running, kv, None, None, None, None, read_at=0.0, by="test", read_mono=0.0)


def view(name, index=0, fig=None, inflight=0, healthy=True, down_until=0.0, sent=0, done=0, rotation=None):
    return View(index, name, healthy, down_until, inflight, fig, sent, done,
                rotation=index if rotation is None else rotation)


def names(decision):
    return [v.name for v in decision.order]


# -- filtering -----------------------------------------------------------------------------------

def test_a_deep_queue_or_a_full_kv_cache_is_left_out_while_another_replica_has_room():
    views = [view("queued", 0, figures(waiting=8)), view("full", 1, figures(kv=0.99)), view("free", 2, figures())]
    decision = choose(views, POLICY)
    assert names(decision)[0] == "free" and decision.reason == "score"
    # the saturated ones stay in the failover order, after the others
    assert set(names(decision)[1:]) == {"queued", "full"}
    assert saturation(views[0], POLICY) == "queue" and saturation(views[1], POLICY) == "kv"


def test_once_vllm_queues_each_request_sent_since_the_figures_counts_towards_the_queue_limit():
    queueing = view("a", 0, figures(waiting=5), sent=2)
    assert saturation(queueing, POLICY) is None
    queueing.sent_since = 3
    assert saturation(queueing, POLICY) == "queue"
    # with no queue in vLLM, a burst between two polls is not a sign of saturation
    idle = view("b", 1, figures(waiting=0, running=40), sent=50)
    assert saturation(idle, POLICY) is None


def test_the_optional_cap_counts_vllm_s_requests_and_this_worker_s_since():
    capped = Policy(max_inflight=10)
    assert saturation(view("a", fig=figures(waiting=0, running=9)), capped) is None
    assert saturation(view("a", fig=figures(waiting=1, running=9)), capped) == "cap"
    assert saturation(view("a", fig=figures(running=8), sent=2), capped) == "cap"
    assert saturation(view("a", fig=figures(running=8), sent=2, done=1), capped) is None  # one of them ended
    assert saturation(view("a", fig=figures(running=100)), POLICY) is None  # no cap by default


def test_cooling_off_replicas_come_last_soonest_back_first():
    views = [view("late", 0, figures(), healthy=False, down_until=20), view("soon", 1, figures(), healthy=False,
                                                                             down_until=10), view("ok", 2, figures(waiting=7))]
    assert names(choose(views, POLICY)) == ["ok", "soon", "late"]
    only_cooling = choose(views[:2], POLICY)
    assert names(only_cooling) == ["soon", "late"] and only_cooling.reason == "cooling_off"


# -- scoring ---------------------------------------------------------------------------------------

def test_score_is_queue_plus_normalised_running_plus_kv():
    views = [view("a", 0, figures(waiting=2, running=10, kv=0.5)), view("b", 1, figures(waiting=0, running=20, kv=0.25))]
    decision = choose(views, POLICY)
    # a: 1*2 + 1*10/20 + 2*0.5 = 3.5; b: 0 + 1*20/20 + 2*0.25 = 1.5
    assert decision.scores == {"a": 3.5, "b": 1.5}
    assert names(decision) == ["b", "a"]
    # weights are settings: running counting more, a (2 + 10*0.5 + 1 = 8) beats b (0 + 10 + 0.5)
    assert names(choose(views, Policy(w_running=10))) == ["a", "b"]


def test_requests_sent_since_the_poll_spread_a_burst():
    """Between two polls the figures do not move; this worker's own sends since them do."""
    figs = {n: figures(running=4) for n in "abc"}
    sent = dict.fromkeys("abc", 0)
    chosen = []
    for _ in range(9):
        views = [view(n, i, figs[n], sent=sent[n], rotation=0) for i, n in enumerate("abc")]
        first = choose(views, POLICY).order[0].name
        sent[first] += 1
        chosen.append(first)
    assert sent == {"a": 3, "b": 3, "c": 3}


def test_ties_go_to_the_fewest_in_flight_then_in_turn():
    views = [view("a", 0, figures(), inflight=3, rotation=0), view("b", 1, figures(), inflight=1, rotation=1),
             view("c", 2, figures(), inflight=1, rotation=2)]
    assert names(choose(views, POLICY)) == ["b", "c", "a"]
    views[2].rotation, views[1].rotation = 0, 2
    assert names(choose(views, POLICY))[0] == "c"


# -- fail open -------------------------------------------------------------------------------------

def test_no_fresh_figures_anywhere_is_least_in_flight():
    views = [view("a", 0, None, inflight=2), view("b", 1, None, inflight=0), view("c", 2, None, inflight=1)]
    decision = choose(views, POLICY)
    assert names(decision) == ["b", "c", "a"] and decision.reason == "fail_open"
    assert has_room(views, POLICY)


def test_a_replica_without_figures_is_never_refused_for_that():
    views = [view("saturated", 0, figures(waiting=30)), view("unknown", 1, None, inflight=9)]
    decision = choose(views, POLICY)
    assert names(decision) == ["unknown", "saturated"] and decision.reason == "fail_open"
    assert has_room(views, POLICY)
    # but while a replica with figures has room, it comes first
    views.append(view("free", 2, figures()))
    assert names(choose(views, POLICY)) == ["free", "unknown", "saturated"]


def test_every_replica_saturated_means_no_room():
    views = [view("a", 0, figures(waiting=9)), view("b", 1, figures(kv=0.96))]
    assert not has_room(views, POLICY)
    assert choose(views, POLICY).reason == "saturated"


def test_saturated_replicas_are_ordered_by_score():
    views = [view("a", 0, figures(waiting=9)), view("b", 1, figures(kv=0.96))]
    assert names(choose(views, POLICY)) == ["b", "a"]  # b: 2 * 0.96 = 1.92 < a: 9


def test_only_cooling_replicas_leave_room_for_the_failover_path():
    assert has_room([view("a", 0, figures(waiting=30), healthy=False)], POLICY)


# -- affinity --------------------------------------------------------------------------------------

def _key_for(target: str, among: list) -> str:
    return next(f"s:{i}" for i in range(10_000) if rendezvous(f"s:{i}", among) == target)


def test_a_session_goes_to_its_replica_while_within_the_slack():
    key = _key_for("b", ["a", "b", "c"])
    views = [view("a", 0, figures()), view("b", 1, figures(waiting=3)), view("c", 2, figures())]
    decision = choose(views, POLICY, key)
    assert names(decision)[0] == "b" and decision.reason == "affinity"  # 3 - 0 <= 4


def test_a_session_replica_much_busier_than_the_best_is_overridden():
    key = _key_for("b", ["a", "b", "c"])
    views = [view("a", 0, figures()), view("b", 1, figures(waiting=5)), view("c", 2, figures(waiting=1))]
    decision = choose(views, POLICY, key)
    assert names(decision)[0] == "a" and decision.reason == "affinity_overridden"  # 5 - 0 > 4
    assert names(choose(views, Policy(affinity_slack=5), key))[0] == "b"
    assert choose(views, Policy(affinity=False), key).reason == "score"


def test_a_saturated_session_replica_hands_its_sessions_to_the_others_only():
    among = ["a", "b", "c"]
    keys = [f"s:{i}" for i in range(300)]
    before = {k: rendezvous(k, among) for k in keys}
    views = [view("a", 0, figures()), view("b", 1, figures(kv=0.99)), view("c", 2, figures())]
    after = {k: names(choose(views, POLICY, k))[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "b"}  # rendezvous: only b's sessions move


def test_affinity_needs_figures():
    views = [view("a", 0, None, inflight=1), view("b", 1, None, inflight=0)]
    assert choose(views, POLICY, _key_for("a", ["a", "b"])).order[0].name == "b"


def test_rendezvous_spreads_and_is_stable():
    among = ["a", "b", "c", "d"]
    assert {rendezvous(f"k{i}", among) for i in range(200)} == set(among)
    assert all(rendezvous(f"k{i}", among) == rendezvous(f"k{i}", list(reversed(among))) for i in range(50))


def test_every_reason_is_in_the_fixed_set():
    assert set(choice.ROUTE_REASONS) >= {"score", "affinity", "affinity_overridden", "fail_open", "saturated",
                                         "cooling_off", "sticky", "single", "failover"}


# -- the session key ----------------------------------------------------------------------------

def test_session_key_precedence():
    assert session_key("conv-1", "resp_1", "alice", b"prompt") == "s:conv-1"
    assert session_key(None, "resp_1", "alice", b"prompt") == "r:resp_1"
    assert session_key(None, None, "alice", b"prompt") == "u:alice"
    assert session_key(None, None, None, b"prompt").startswith("p:")
    assert session_key(None, None, None, None) is None
    assert session_key("x" * 5000, None, None, None) == "s:" + "x" * choice.MAX_KEY_CHARS


def chat(*messages, **extra):
    return json.dumps({"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}).encode()


def head(body: bytes, limit: int = 1024):
    return prompt_head(body, body_fields(body, "application/json"), limit)


def test_a_conversation_keeps_its_prompt_head_across_turns():
    turn1 = chat(("system", "be brief"), ("user", "what is a KV cache?"))
    turn2 = chat(("system", "be brief"), ("user", "what is a KV cache?"), ("assistant", "a cache"),
                 ("user", "and prefix caching?"), temperature=0.2)
    assert head(turn1) == head(turn2) and head(turn1)
    other = chat(("system", "be brief"), ("user", "something else"))
    assert head(other) != head(turn1)  # same system prompt, another conversation


def test_without_a_system_prompt_the_first_user_message_is_the_head():
    assert head(chat(("user", "hi"))) == head(chat(("user", "hi"), ("assistant", "hello"), ("user", "more")))


def test_each_message_of_the_head_is_cut_to_the_limit():
    long_system = "s" * 5000
    a = head(chat(("system", long_system), ("user", "one")), limit=100)
    b = head(chat(("system", long_system), ("user", "two")), limit=100)
    assert a != b and len(a) <= 2 * 100 + 1


@pytest.mark.parametrize("payload", [
    {"model": "m", "prompt": "Once upon a time"},
    {"model": "m", "prompt": [1, 2, 3, 4]},
    {"model": "m", "input": "hello"},
    {"model": "m", "input": [{"role": "user", "content": "hello"}]},
])
def test_other_prompt_shapes_have_a_head(payload):
    assert head(json.dumps(payload).encode())


def test_no_prompt_no_head():
    assert head(b'{"model": "m"}') is None
    assert prompt_head(b"", None, 1024) is None
    assert prompt_head(b"--x", {"model": "m"}, 1024) is None


def test_a_large_body_gives_the_same_head_from_its_one_parse():
    small = chat(("system", "be brief"), ("user", "what is a KV cache?"))
    filler = [{"role": "assistant", "content": "x" * 1000}] * (SMALL_BODY // 900)
    big = json.dumps({"model": "m", "messages": json.loads(small)["messages"] + filler}).encode()
    assert len(big) > SMALL_BODY
    fields = body_fields(big, "application/json")
    assert type(fields).__name__ == "LeanFields" and fields.prompt_source is not None
    assert prompt_head(big, fields, 1024) == head(small)


# -- speed-weighted affinity ---------------------------------------------------------------------

def test_weighted_rendezvous_gives_each_replica_a_share_of_sessions_proportional_to_its_weight():
    replicas = ["fast1", "fast2", "slow"]
    weights = {"fast1": 1.0, "fast2": 1.0, "slow": 0.5}
    counts = {name: 0 for name in replicas}
    for i in range(20000):
        counts[rendezvous(f"session-{i}", replicas, weights)] += 1
    assert counts["slow"] / 20000 == pytest.approx(0.5 / 2.5, abs=0.01)
    assert counts["fast1"] / 20000 == pytest.approx(1 / 2.5, abs=0.015)
    # A session keeps its replica while the weights stay; one replica leaving moves only its own.
    before = {i: rendezvous(f"session-{i}", replicas, weights) for i in range(2000)}
    after = {i: rendezvous(f"session-{i}", ["fast1", "fast2"], weights) for i in range(2000)}
    assert all(after[i] == before[i] for i in before if before[i] != "slow")


def test_speed_weights_are_decode_rates_relative_to_the_fastest_in_tenth_steps():
    def timed(name, index, rate):
        return view(name, index, SimpleNamespace(waiting=0, running=1, kv=0.0, decode_rate=rate))
    views = [timed("a", 0, 60.0), timed("b", 1, 58.0), timed("c", 2, 29.0), view("d", 3, None)]
    assert choice.speed_weights(views) == {"a": 1.0, "b": 1.0, "c": 0.5}
    # all alike (within a step), or fewer than two measured: plain rendezvous
    assert choice.speed_weights([timed("a", 0, 60.0), timed("b", 1, 58.0)]) is None
    assert choice.speed_weights([timed("a", 0, 60.0), timed("b", 1, None)]) is None
    # a near-stalled replica still weighs one step
    assert choice.speed_weights([timed("a", 0, 60.0), timed("b", 1, 0.5)]) == {"a": 1.0, "b": 0.1}


def test_a_half_speed_replica_gets_about_half_the_sessions_of_a_fast_one():
    def timed(name, index, rate):
        return view(name, index, SimpleNamespace(waiting=0, running=1, kv=0.0, decode_rate=rate))
    views = [timed("fast1", 0, 60.0), timed("fast2", 1, 60.0), timed("slow", 2, 30.0)]
    firsts = [names(choose(views, POLICY, session=f"s{i}"))[0] for i in range(6000)]
    assert firsts.count("slow") / 6000 == pytest.approx(0.2, abs=0.02)
