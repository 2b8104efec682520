"""Readiness against a real vLLM: a wrong upstream key or base URL is unhealthy, and says why."""
import pytest

from app import create_app
from tests.conftest import MASTER, gateway_environ
from tests.realvllm.conftest import VLLM_KEY


def readiness(base: str, key: str | None):
    env = gateway_environ(base)
    if key is None:
        del env["HOSTED_VLLM_API_KEY"]
    else:
        env["HOSTED_VLLM_API_KEY"] = key
    resp = create_app({"environ": env}).test_client().get("/health/readiness", headers=MASTER)
    return resp.status_code, resp.get_json()["dependencies"]["upstream"]["replicas"][0]["detail"]


def test_ready_with_the_right_key(real_vllm):
    assert readiness(real_vllm.url, VLLM_KEY) == (200, "HTTP 200")


@pytest.mark.parametrize("key,cause", [
    ("not-the-vllm-key-1234", "refused the gateway's upstream key (HTTP 401 on /v1/models)"),
    (None, "vLLM requires a key (HTTP 401 on /v1/models)"),
])
def test_unhealthy_when_vllm_refuses_the_key(real_vllm, key, cause):
    status, detail = readiness(real_vllm.url, key)
    assert status == 503 and cause in detail
    assert key is None or key not in detail


def test_unhealthy_when_the_base_url_ends_in_v1(real_vllm):
    status, detail = readiness(real_vllm.url + "/v1", VLLM_KEY)
    assert status == 503 and "HTTP 404 on /health" in detail and "without /v1" in detail
