"""Start-up validation: the gateway never runs open and says what to set."""
import subprocess
import sys

import pytest

from gateway.core.config import ConfigError, load_settings
from tests.conftest import MASTER_KEY, ROOT

BASE = {"HOSTED_VLLM_API_BASE": "http://vllm:8000", "LITELLM_MASTER_KEY": MASTER_KEY}


def test_missing_master_key_refused_with_a_recipe():
    with pytest.raises(ConfigError, match="LITELLM_MASTER_KEY is not set.*secrets.token_urlsafe"):
        load_settings({"HOSTED_VLLM_API_BASE": "http://vllm:8000"})


@pytest.mark.parametrize("weak", ["sk-1234", "changeme", "short-key-123", "sk-123456789012"])
def test_weak_master_key_refused_unless_opted_in(weak):
    with pytest.raises(ConfigError, match="publicly known or shorter"):
        load_settings({**BASE, "LITELLM_MASTER_KEY": weak})
    assert load_settings({**BASE, "LITELLM_MASTER_KEY": weak, "ALLOW_WEAK_MASTER_KEY": "1"}).master_key == weak


def test_missing_base_refused():
    with pytest.raises(ConfigError, match="HOSTED_VLLM_API_BASE is not set"):
        load_settings({"LITELLM_MASTER_KEY": MASTER_KEY})


@pytest.mark.parametrize("bad", ["vllm:8000", "ftp://vllm", "http://", "http://vllm:99999",
                                 "http://user:pw@vllm", "http://vllm/?x=1"])
def test_bad_base_refused(bad):
    with pytest.raises(ConfigError, match="HOSTED_VLLM_API_BASE"):
        load_settings({**BASE, "HOSTED_VLLM_API_BASE": bad})


def test_base_aliases_and_normalisation():
    env = {"VLLM_API_BASE": "https://gpu.example/prefix//", "LITELLM_MASTER_KEY": MASTER_KEY}
    assert load_settings(env).upstream_base == "https://gpu.example/prefix"
    env["HOSTED_VLLM_API_BASE"] = "http://other:8000/"
    assert load_settings(env).upstream_base == "http://other:8000"


@pytest.mark.parametrize("name", ["UPSTREAM_CONNECT_TIMEOUT", "UPSTREAM_READ_TIMEOUT", "MAX_REQUEST_BODY_BYTES"])
def test_bad_numbers_refused(name):
    with pytest.raises(ConfigError, match=name):
        load_settings({**BASE, name: "soon"})
    with pytest.raises(ConfigError):
        load_settings({**BASE, name: "-1"})


def test_defaults():
    s = load_settings(BASE)
    assert (s.connect_timeout, s.read_timeout, s.max_body_bytes) == (5.0, 600.0, 64 * 1024 * 1024)


def test_gunicorn_refuses_to_start_without_master_key():
    env = {"PATH": "/usr/bin:/bin", "HOSTED_VLLM_API_BASE": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
                           "--bind", "127.0.0.1:0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "LITELLM_MASTER_KEY is not set" in proc.stderr
