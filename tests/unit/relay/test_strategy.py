"""ROUTING_STRATEGY: load (default), least_busy (= ROUTING_LOAD_AWARE=0), round_robin."""
import pytest

from gateway.core.config import ConfigError, load_settings
from gateway.relay import choice
from gateway.relay.replicas import Replicas
from tests.conftest import MASTER_KEY

THREE = {"HOSTED_VLLM_API_BASE": "http://a:8000,http://b:8000,http://c:8000", "LITELLM_MASTER_KEY": MASTER_KEY}


class FakeUpstream:
    def __init__(self, base):
        self.base = base


def replica_set(**kwargs):
    return Replicas([FakeUpstream(b) for b in THREE["HOSTED_VLLM_API_BASE"].split(",")], cooloff=10, **kwargs)


@pytest.mark.parametrize("env, strategy, load_aware", [
    ({}, "load", True),
    ({"ROUTING_STRATEGY": "load"}, "load", True),
    ({"ROUTING_STRATEGY": "least_busy"}, "least_busy", False),
    ({"ROUTING_LOAD_AWARE": "0"}, "least_busy", False),
    ({"ROUTING_LOAD_AWARE": "0", "ROUTING_STRATEGY": "least_busy"}, "least_busy", False),
    ({"ROUTING_STRATEGY": " Round_Robin "}, "round_robin", False),
    ({"ROUTING_LOAD_AWARE": "1", "ROUTING_STRATEGY": "load"}, "load", True),
])
def test_the_strategy_and_the_load_aware_switch(env, strategy, load_aware):
    s = load_settings({**THREE, **env})
    assert (s.routing_strategy, s.routing_load_aware) == (strategy, load_aware)
    # only "load" reads vLLM's /metrics and queues requests
    assert s.routing_polls is load_aware and s.routing_admission_on is load_aware


@pytest.mark.parametrize("env, message", [
    ({"ROUTING_STRATEGY": "random"}, "ROUTING_STRATEGY must be load, least_busy or round_robin, got 'random'"),
    ({"ROUTING_LOAD_AWARE": "0", "ROUTING_STRATEGY": "load"}, "ROUTING_LOAD_AWARE=0 contradicts ROUTING_STRATEGY=load"),
    ({"ROUTING_LOAD_AWARE": "1", "ROUTING_STRATEGY": "round_robin"}, "contradicts ROUTING_STRATEGY=round_robin"),
])
def test_a_bad_or_contradictory_strategy_is_refused_in_one_line(env, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings({**THREE, **env})
    assert "\n" not in str(refused.value)


def test_round_robin_takes_the_replicas_in_turn_whatever_their_load():
    replicas = replica_set(round_robin=True)
    a, b, c = replicas.replicas
    a.inflight = 50  # least busy would never pick it
    firsts = []
    for _ in range(6):
        order, reason = replicas.decide(session="s:conversation")  # no affinity either
        assert reason == "round_robin" and len(order) == 3
        firsts.append(order[0])
    assert firsts == [a, b, c, a, b, c]


def test_round_robin_puts_replicas_cooling_off_last_soonest_back_first():
    replicas = replica_set(round_robin=True)
    a, b, c = replicas.replicas
    a.down_until = 1e12
    c.down_until = 1e11
    firsts = [replicas.decide()[0] for _ in range(3)]
    assert all(order == [b, c, a] for order in firsts)


def test_least_busy_is_the_choice_without_figures():
    replicas = replica_set()
    a, b, c = replicas.replicas
    a.inflight, b.inflight, c.inflight = 3, 1, 2
    order, reason = replicas.decide(session="s:x")
    assert order == [b, c, a] and reason == "fail_open"


def test_in_turn_is_a_pure_order_over_views():
    views = [choice.View(0, "a", rotation=2), choice.View(1, "b", rotation=0),
             choice.View(2, "c", healthy=False, down_until=5.0, rotation=1)]
    assert [v.name for v in choice.in_turn(views)] == ["b", "a", "c"]
    assert "round_robin" in choice.ROUTE_REASONS
