"""The ROUTING_* settings and GATEWAY_INSTANCE_ID: defaults, and a bad value refused in one line."""
import subprocess
import sys

import pytest

from gateway.core.config import ConfigError, load_settings
from tests.conftest import MASTER_KEY, ROOT, free_port

ONE = {"HOSTED_VLLM_API_BASE": "http://vllm-a:8000", "LITELLM_MASTER_KEY": MASTER_KEY}
TWO = {**ONE, "HOSTED_VLLM_API_BASE": "http://vllm-a:8000,http://vllm-b:8000"}


def test_defaults():
    s = load_settings(TWO)
    assert (s.routing_load_aware, s.routing_poll_interval, s.routing_poll_timeout, s.routing_stale_after) == \
        (True, 0.25, 0.5, 2.0)
    assert (s.routing_max_waiting, s.routing_max_kv, s.routing_max_inflight) == (8, 0.95, 0)
    assert (s.routing_weight_queue, s.routing_weight_running, s.routing_weight_kv) == (1.0, 1.0, 2.0)
    assert (s.routing_affinity, s.routing_affinity_slack, s.routing_affinity_prefix_bytes) == (True, 4.0, 1024)
    assert (s.routing_queue_max, s.routing_queue_timeout, s.instance_id) == (256, 30.0, None)


def test_admission_control_is_on_with_several_replicas_and_asked_for_with_one():
    assert load_settings(TWO).routing_admission_on and load_settings(TWO).routing_polls
    one = load_settings(ONE)
    assert not one.routing_admission_on and not one.routing_polls  # one replica: no polling at all
    asked = load_settings({**ONE, "ROUTING_ADMISSION": "1"})
    assert asked.routing_admission_on and asked.routing_polls
    assert not load_settings({**TWO, "ROUTING_ADMISSION": "0"}).routing_admission_on
    assert load_settings({**TWO, "ROUTING_ADMISSION": "0"}).routing_polls  # still routes by the figures
    off = load_settings({**TWO, "ROUTING_LOAD_AWARE": "0", "ROUTING_ADMISSION": "1"})
    assert not off.routing_polls and not off.routing_admission_on


@pytest.mark.parametrize("name, value, message", [
    ("ROUTING_POLL_INTERVAL", "0.001", "ROUTING_POLL_INTERVAL must be between"),
    ("ROUTING_POLL_INTERVAL", "fast", "ROUTING_POLL_INTERVAL must be a number"),
    ("ROUTING_POLL_TIMEOUT", "0", "ROUTING_POLL_TIMEOUT must be more than 0"),
    ("ROUTING_STALE_AFTER", "0.3", "ROUTING_STALE_AFTER must be at least twice"),
    ("ROUTING_STALE_AFTER", "nan", "ROUTING_STALE_AFTER must be a finite number"),
    ("ROUTING_MAX_WAITING", "0", "ROUTING_MAX_WAITING must be 1 or more"),
    ("ROUTING_MAX_WAITING", "2.5", "ROUTING_MAX_WAITING must be a number"),
    ("ROUTING_MAX_KV", "95", "ROUTING_MAX_KV must be more than 0 and at most 1"),
    ("ROUTING_MAX_INFLIGHT_PER_REPLICA", "-1", "ROUTING_MAX_INFLIGHT_PER_REPLICA must be 0"),
    ("ROUTING_WEIGHT_KV", "-2", "must be 0 or more"),
    ("ROUTING_WEIGHT_QUEUE", "inf", "ROUTING_WEIGHT_QUEUE must be a finite number"),
    ("ROUTING_AFFINITY_SLACK", "-1", "must be 0 or more"),
    ("ROUTING_AFFINITY_PREFIX_BYTES", "8", "ROUTING_AFFINITY_PREFIX_BYTES must be between"),
    ("ROUTING_QUEUE_MAX", "-5", "ROUTING_QUEUE_MAX must be 0"),
    ("ROUTING_QUEUE_TIMEOUT", "0", "ROUTING_QUEUE_TIMEOUT must be more than 0"),
    ("ROUTING_AFFINITY", "maybe", "ROUTING_AFFINITY must be 1 or 0"),
    ("ROUTING_LOAD_AWARE", "2", "ROUTING_LOAD_AWARE must be 1 or 0"),
    ("ROUTING_ADMISSION", "auto", "ROUTING_ADMISSION must be 1 or 0"),
    ("GATEWAY_INSTANCE_ID", "gw 1", "GATEWAY_INSTANCE_ID must be"),
])
def test_bad_values_are_refused_naming_the_setting(name, value, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings({**TWO, name: value})
    assert "\n" not in str(refused.value)


def test_gunicorn_refuses_a_bad_routing_setting_in_one_line():
    env = {"PATH": "/usr/bin:/bin", **TWO, "ALLOW_EPHEMERAL_KEYSTORE": "1", "ROUTING_MAX_KV": "95"}
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
                           "--bind", f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("gateway configuration error")]
    assert "ROUTING_MAX_KV" in line and "Booting worker" not in proc.stderr
