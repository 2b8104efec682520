"""gateway.usage.modellimits: the per-model admission script, refunds, settled usage."""
import pytest

from gateway.core.errors import GatewayError
from gateway.core.redisnames import RedisNames
from gateway.usage.modellimits import ModelLimits, applies, queue_usage
from tests.unit.usage.conftest import TOKEN_A, entry

KEY = {"model_rpm_limit": {"m": 2}, "model_tpm_limit": {"m": 10},
       "model_max_budget": {"m": {"budget_limit": 0.02, "time_period": "1h"}}}
NOW = 1_800_000_030.0  # 30 s into a minute and into an hour


@pytest.fixture
def limits(redis_client):
    return ModelLimits(redis_client, RedisNames(redis_client.test_prefix))


def settle(limits, **overrides):
    pipe = limits.redis.pipeline(transaction=False)
    queue_usage(pipe, limits.names, entry(model="m", start_time=NOW, end_time=NOW, **overrides), KEY)
    pipe.execute()


def test_applies_only_with_a_per_model_field():
    assert applies(KEY) and not applies({"rpm_limit": 3, "model_rpm_limit": {}})


def test_rpm_exact_and_refund(limits):
    assert limits.admit(TOKEN_A, KEY, "m", True, NOW) is not None
    second = limits.admit(TOKEN_A, KEY, "m", True, NOW)
    with pytest.raises(GatewayError) as err:
        limits.admit(TOKEN_A, KEY, "m", True, NOW)
    assert err.value.status == 429 and err.value.kind == "rpm" and err.value.headers["Retry-After"] == "30"
    limits.refund(second)
    limits.refund(second)  # a second refund gives nothing back
    assert limits.admit(TOKEN_A, KEY, "m", True, NOW) is not None
    with pytest.raises(GatewayError):
        limits.admit(TOKEN_A, KEY, "m", True, NOW)


def test_other_models_and_bodiless_requests_are_not_limited(limits):
    assert limits.admit(TOKEN_A, KEY, "other", True, NOW) is None
    assert limits.admit(TOKEN_A, KEY, None, False, NOW) is None
    with pytest.raises(GatewayError) as err:
        limits.admit(TOKEN_A, KEY, None, True, NOW)
    assert err.value.status == 403


def test_tpm_and_budget_from_settled_usage(limits):
    settle(limits, prompt_tokens=4, completion_tokens=6, spend=0.013)
    with pytest.raises(GatewayError) as err:
        limits.admit(TOKEN_A, KEY, "m", True, NOW)
    assert err.value.kind == "tpm"
    assert limits.admit(TOKEN_A, KEY, "m", True, NOW + 60) is not None  # the next minute
    settle(limits, prompt_tokens=0, completion_tokens=0, spend=0.007)  # 0.013 + 0.007 = the budget, exactly
    with pytest.raises(GatewayError) as err:
        limits.admit(TOKEN_A, KEY, "m", True, NOW + 120)
    assert err.value.status == 400 and err.value.type == "budget_exceeded"
    assert "spend 0.020000 >= model_max_budget 0.020000 (resets in 3450s)" in err.value.message
    assert limits.admit(TOKEN_A, KEY, "m", True, NOW + 3600) is not None  # the next period
