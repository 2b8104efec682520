"""REDIS_URL is checked at start-up, and running without Redis needs an explicit opt-in
(issue 12, points 14 and 16)."""
import pytest

from gateway.core.config import ConfigError, load_settings, require_keystore
from tests.conftest import MASTER_KEY

BASE = {"HOSTED_VLLM_API_BASE": "http://vllm:8000", "LITELLM_MASTER_KEY": MASTER_KEY}


@pytest.mark.parametrize("url", [
    "localhost:6379", "127.0.0.1:6379/0", "user:secretpw@redis-host:6379", "http://redis:6379/0", "redis://",
    "redis://h:99999/0",
])
def test_a_redis_url_without_a_usable_scheme_host_or_port_is_one_line_naming_the_variable(url):
    with pytest.raises(ConfigError, match="^REDIS_URL") as caught:
        load_settings({**BASE, "REDIS_URL": url})
    assert "\n" not in str(caught.value) and "secretpw" not in str(caught.value)


@pytest.mark.parametrize("url", [
    "redis://h:6379/abc", "redis://h:6379/db1", "redis://h:6379/1.5", "redis://h:6379/0/1", "redis://h:6379/-1",
    "redis://h:6379/%31", "redis://h:6379/1?db=x", "redis://h:6379/1?db=2", "unix:///tmp/r.sock?db=one",
])
def test_a_bad_database_number_is_refused(url):
    """redis-py reads most of these as database 0 (or 1) without a word."""
    with pytest.raises(ConfigError, match="^REDIS_URL.*database"):
        load_settings({**BASE, "REDIS_URL": url})


@pytest.mark.parametrize("url", [
    "redis://h:6379", "redis://h:6379/", "redis://h:6379/3", "rediss://:pw@h:6380/0", "redis://h?db=2",
    "unix:///tmp/r.sock", "unix:///tmp/r.sock?db=2",
])
def test_good_redis_urls_pass(url):
    assert load_settings({**BASE, "REDIS_URL": url}).redis_url == url


def test_database_url_pointing_at_redis_is_checked_too():
    with pytest.raises(ConfigError, match="database"):
        load_settings({**BASE, "DATABASE_URL": "redis://h:6379/zero"})


def test_no_redis_needs_the_opt_in():
    with pytest.raises(ConfigError, match="REDIS_URL is not set.*ALLOW_EPHEMERAL_KEYSTORE=1"):
        require_keystore(load_settings(BASE))
    require_keystore(load_settings({**BASE, "ALLOW_EPHEMERAL_KEYSTORE": "1"}))
    require_keystore(load_settings({**BASE, "REDIS_URL": "redis://h:6379/0"}))


def test_create_app_refuses_too_unless_a_client_is_injected():
    import fakeredis

    from app import create_app

    env = {**BASE, "HOSTED_VLLM_API_BASE": "http://127.0.0.1:9"}
    with pytest.raises(ConfigError, match="REDIS_URL is not set"):
        create_app({"environ": env})
    assert create_app({"environ": env, "redis": fakeredis.FakeRedis(decode_responses=True)})
