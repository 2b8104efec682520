"""Sentinel and Redis Cluster settings (issue 13): each way to name them, read into one
RedisTopology, and every contradictory combination refused at start-up in one line that names
the setting and never echoes a password."""
import pytest

from gateway.core.config import ConfigError, load_settings, redis_url_from
from tests.conftest import MASTER_KEY

BASE = {"HOSTED_VLLM_API_BASE": "http://vllm:8000", "LITELLM_MASTER_KEY": MASTER_KEY}


def topology(**env):
    return load_settings({**BASE, **env}).redis_topology


def test_a_sentinel_url_names_the_sentinels_the_service_the_database_and_the_data_nodes_password():
    t = topology(REDIS_URL="redis+sentinel://app:p%40ss@s1:26379,s2:26380,s3/mymaster/2")
    assert (t.kind, t.nodes, t.service, t.db) == ("sentinel", (("s1", 26379), ("s2", 26380), ("s3", 26379)),
                                                 "mymaster", 2)
    assert (t.username, t.password, t.ssl) == ("app", "p@ss", False)
    assert "p@ss" not in repr(t)


def test_redis_sentinels_is_the_same_setup_with_separate_settings():
    env = {"REDIS_SENTINELS": "s1:26379, s2:26380", "REDIS_SENTINEL_SERVICE": "mymaster",
           "REDIS_PASSWORD": "data/pw", "REDIS_SENTINEL_PASSWORD": "sentinel-pw",
           "REDIS_SENTINEL_USERNAME": "watcher", "REDIS_SENTINEL_SSL": "1"}
    t = topology(**env)
    assert (t.kind, t.nodes, t.service, t.db) == ("sentinel", (("s1", 26379), ("s2", 26380)), "mymaster", 0)
    assert (t.password, t.sentinel_username, t.sentinel_password, t.ssl) == ("data/pw", "watcher", "sentinel-pw", True)
    # gunicorn.conf.py reads this to decide between 1 worker (no Redis) and WEB_CONCURRENCY
    assert redis_url_from({**BASE, **env})


def test_rediss_sentinel_means_tls():
    assert topology(REDIS_URL="rediss+sentinel://s1:26379/mymaster").ssl is True


@pytest.mark.parametrize("env", [
    {"REDIS_URL": "redis+cluster://:pw@n1:7000,n2:7001"},
    {"REDIS_URL": "redis://:pw@n1:7000", "REDIS_CLUSTER": "1"},
])
def test_a_cluster_is_named_by_its_url_scheme_or_redis_cluster(env):
    t = topology(**env)
    assert (t.kind, t.nodes[0], t.password, t.db) == ("cluster", ("n1", 7000), "pw", 0)
    assert "pw" not in repr(t)


def test_a_plain_redis_url_stays_one_node():
    t = topology(REDIS_URL="redis://h:6379/3")
    assert (t.kind, t.url) == ("single", "redis://h:6379/3")
    assert load_settings(BASE, allow_ephemeral_keystore=True).redis_topology is None


@pytest.mark.parametrize("env, words", [
    ({"REDIS_URL": "redis+sentinel://s1:26379"}, "^REDIS_URL names no Sentinel service"),
    ({"REDIS_URL": "redis+sentinel://s1:26379/"}, "^REDIS_URL names no Sentinel service"),
    ({"REDIS_URL": "redis+sentinel://:secretpw@s1:x/m"}, "^REDIS_URL must list host:port"),
    ({"REDIS_URL": "redis+sentinel://s1:26379,/m"}, "^REDIS_URL must list host:port"),
    ({"REDIS_URL": "redis+sentinel://s1/m/zero"}, "^REDIS_URL: the database number"),
    ({"REDIS_URL": "redis+cluster://n1:7000/3"}, "a Redis Cluster has only database 0"),
    ({"REDIS_SENTINELS": "s1:26379"}, "^REDIS_SENTINELS needs REDIS_SENTINEL_SERVICE"),
    ({"REDIS_SENTINEL_SERVICE": "mymaster"}, "^REDIS_SENTINEL_SERVICE is set but REDIS_SENTINELS is not"),
    ({"REDIS_SENTINELS": "s1:26379", "REDIS_SENTINEL_SERVICE": "m", "REDIS_URL": "redis://:secretpw@h:6379"},
     "REDIS_SENTINELS .*or REDIS_URL, not both"),
    ({"REDIS_SENTINELS": "s1:99999", "REDIS_SENTINEL_SERVICE": "m"}, "^REDIS_SENTINELS must list host:port"),
    ({"REDIS_URL": "redis://:secretpw@h:6379", "REDIS_PASSWORD": "secretpw"}, "^REDIS_USERNAME/REDIS_PASSWORD"),
    ({"REDIS_URL": "redis://h:6379", "REDIS_SENTINEL_PASSWORD": "secretpw"}, "^REDIS_SENTINEL_USERNAME/PASSWORD/SSL"),
    ({"REDIS_URL": "redis+cluster://h:7000", "REDIS_SENTINEL_SSL": "1"}, "^REDIS_SENTINEL_USERNAME/PASSWORD/SSL"),
    ({"REDIS_URL": "redis+sentinel://s1/m", "REDIS_CLUSTER": "1"}, "^REDIS_CLUSTER=1 and a Sentinel setup contradict"),
    ({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_SERVICE": "m", "REDIS_CLUSTER": "1"}, "^REDIS_CLUSTER=1 and a Sentinel"),
    ({"REDIS_URL": "unix:///tmp/r.sock", "REDIS_CLUSTER": "1"}, "^REDIS_CLUSTER=1 needs a redis://"),
    ({"REDIS_URL": "redis://:secretpw@h:7000/2", "REDIS_CLUSTER": "1"}, "a Redis Cluster has only database 0"),
    ({"REDIS_CLUSTER": "1", "ALLOW_EPHEMERAL_KEYSTORE": "1"}, "^REDIS_CLUSTER=1 needs REDIS_URL"),
])
def test_contradictions_and_malformed_topologies_are_refused_in_one_line(env, words):
    with pytest.raises(ConfigError, match=words) as caught:
        load_settings({**BASE, **env})
    assert "\n" not in str(caught.value) and "secretpw" not in str(caught.value)
