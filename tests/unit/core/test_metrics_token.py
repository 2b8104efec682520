"""METRICS_TOKEN: a read-only credential that opens GET /metrics and nothing else."""
import re

import fakeredis
import pytest

from gateway.core import metrics as metrics_module
from gateway.core.config import ConfigError, load_settings
from gateway.core.metrics import ScrapeToken
from tests.conftest import MASTER, MASTER_KEY, build_app, gateway_environ

TOKEN = "mt-scrape-0123456789abcdef-secret"
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}
DEAD_VLLM = "http://127.0.0.1:9"  # nothing listens: the probe is refused at once, no vLLM needed


def env(**extra) -> dict:
    return gateway_environ(DEAD_VLLM, **extra)


# -- the setting ----------------------------------------------------------------------------------

def test_metrics_token_is_read_from_the_environment_and_kept_out_of_the_settings_repr():
    settings = load_settings(env(METRICS_TOKEN=f"  {TOKEN}  "))
    assert settings.metrics_token == TOKEN
    assert TOKEN not in repr(settings)
    assert load_settings(env()).metrics_token is None
    assert load_settings(env(METRICS_TOKEN="   ")).metrics_token is None


@pytest.mark.parametrize("token, says", [
    ("short-tok-123", "shorter than 16 characters"),
    (MASTER_KEY, "must differ from LITELLM_MASTER_KEY"),
])
def test_a_weak_or_reused_metrics_token_stops_the_start_without_echoing_it(token, says):
    with pytest.raises(ConfigError) as caught:
        load_settings(env(METRICS_TOKEN=token))
    message = str(caught.value)
    assert "METRICS_TOKEN" in message and says in message
    assert token not in message and "\n" not in message


# -- the comparison -------------------------------------------------------------------------------

def test_the_scrape_token_matches_itself_only():
    token = ScrapeToken(TOKEN)
    assert token.matches(TOKEN)
    for other in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "", None, MASTER_KEY, "\ud800"):
        assert not token.matches(other)
    unset = ScrapeToken(None)
    assert not any(unset.matches(value) for value in ("", None, TOKEN))


def test_the_scrape_token_is_compared_in_constant_time_on_digests(monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b
    monkeypatch.setattr(metrics_module.hmac, "compare_digest", spy)
    assert ScrapeToken(TOKEN).matches(TOKEN) and not ScrapeToken(TOKEN).matches("x" * 40)
    assert len(compared) == 2 and all(len(a) == len(b) == 32 for a, b in compared)  # sha256 digests
    assert all(TOKEN.encode() not in (a, b) for a, b in compared)


# -- the route --------------------------------------------------------------------------------------

@pytest.fixture
def client(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    app = build_app({"environ": env(METRICS_TOKEN=TOKEN), "redis": fakeredis.FakeRedis(decode_responses=True)})
    return app.test_client()


def auth_failures(client, reason: str) -> float:
    text = client.get("/metrics", headers=MASTER).get_data(as_text=True)
    match = re.search(rf'^vgw_auth_failures_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(match.group(1))


def test_metrics_token_scrapes_metrics(client, capfd):
    resp = client.get("/metrics", headers=SCRAPE)
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    assert "vgw_requests_total" in resp.get_data(as_text=True)
    assert client.get("/metrics", headers=MASTER).status_code == 200  # the master key still does
    out, err = capfd.readouterr()
    assert '"caller":"metrics_token"' in out  # the access log says who scraped, never with what
    assert TOKEN not in out + err


@pytest.mark.parametrize("headers, reason", [
    ({"Authorization": "Bearer mt-scrape-0123456789abcdef-wrong!"}, "invalid_key"),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "invalid_key"),
    ({}, "missing_key"),
])
def test_a_wrong_or_missing_token_gets_401_in_the_error_envelope(client, capfd, headers, reason):
    before = auth_failures(client, reason)
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 401
    error = resp.get_json()["error"]
    assert error["type"] == "auth_error" and error["code"] == "401"
    assert auth_failures(client, reason) == before + 1
    out, err = capfd.readouterr()
    assert TOKEN[:-1] not in resp.get_data(as_text=True) + out + err


@pytest.mark.parametrize("method, path", [("GET", "/key/list"), ("GET", "/spend/logs"),
                                          ("GET", "/vllm/v1/models"), ("POST", "/key/generate"),
                                          ("GET", "/key/info")])
def test_the_metrics_token_opens_nothing_else(client, capfd, method, path):
    resp = client.open(path, method=method, headers=SCRAPE, json={} if method == "POST" else None)
    assert resp.status_code == 401
    assert resp.get_json()["error"]["type"] == "auth_error"
    out, err = capfd.readouterr()
    assert TOKEN not in resp.get_data(as_text=True) + out + err


def test_a_virtual_key_still_gets_403_on_metrics(client):
    key = client.post("/key/generate", headers=MASTER, json={}).get_json()["key"]
    assert client.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 403


def test_metrics_public_still_needs_no_key(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    app = build_app({"environ": env(METRICS_PUBLIC=1), "redis": fakeredis.FakeRedis(decode_responses=True)})
    assert app.test_client().get("/metrics").status_code == 200
