"""Per-model limits of a virtual key, in LiteLLM's names: `model_rpm_limit`, `model_tpm_limit`
(per one-minute window, like the key's rpm_limit/tpm_limit) and `model_max_budget`
({"model": {"budget_limit": dollars, "time_period": "1d"}}).

Admission runs one Lua script per request for the request's model (the real one, after a key's
`aliases` rewrite): nothing is taken unless the model's tpm window and budget period have room,
and then its rpm window is counted with INCR, so the count is exact across workers and instances.
A request refused by a later check (the key's budget reservation, its team) gives the count back
(`refund`, as the key's own limits do: LiteLLM #39309). Tokens and spend are counted when the
request is settled (`queue_usage`, called from the accounting flush), like the key's tpm.

Like LiteLLM's model budget, `model_max_budget` is checked before a request and charged after
it: requests already running when the budget is reached may take the model's spend past it (the
key's own max_budget, which reserves each request's estimate, is the hard cap). Budget periods
are fixed windows counted from 1970-01-01 UTC: `1d` resets at midnight UTC, `1h` on the hour.

Every name lives in the key's hash slot ({token}), so one script never crosses slots.
"""
from __future__ import annotations

import math
import time

from gateway.core.durations import parse_duration
from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.core.timefmt import iso
from gateway.usage.limits import ClusterScript
from gateway.usage.money import as_json, to_nanos, usd_text

# KEYS: rpm window, tpm window, budget-period spend. ARGV: rpm limit, tpm limit, budget nanos
# (-1: no such limit). Checks everything before counting anything.
_ADMIT = """
local rpm_limit, tpm_limit, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm_limit >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= tpm_limit then return {'tpm', tostring(used)} end
end
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent >= budget then return {'budget', tostring(spent)} end
end
local rpm = 0
if rpm_limit >= 0 then
  rpm = tonumber(redis.call('GET', KEYS[1]) or '0')
  if rpm >= rpm_limit then return {'rpm', tostring(rpm)} end
  rpm = redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], 120)
end
return {'ok', tostring(rpm)}
"""

# Give one rpm count back, only while its window exists (a late refund never goes below zero).
_REFUND = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
"""

BUDGET_MARGIN_SECONDS = 3600  # a period's spend outlives it a little: a late settle still lands


def applies(key: dict) -> bool:
    """Whether the key has any per-model limit."""
    return bool(key.get("model_rpm_limit") or key.get("model_tpm_limit") or key.get("model_max_budget"))


def _budget_of(key: dict, model: str) -> tuple[int, int] | None:
    """(budget in nano-dollars, period in seconds) of a model, or None."""
    config = (key.get("model_max_budget") or {}).get(model)
    if config is None:
        return None
    return to_nanos(config["budget_limit"]), max(1, int(parse_duration(config["time_period"])))


class ModelSlot:
    """What an admitted request counted: the rpm window to give back if a later check refuses."""

    __slots__ = ("rpm_name",)

    def __init__(self, rpm_name: str | None):
        self.rpm_name = rpm_name


class ModelLimits:
    """Admission against a key's per-model limits; one per worker."""

    def __init__(self, client, names):
        self.redis = client
        self.names = names
        self._admit = ClusterScript(client, _ADMIT)
        self._refund = ClusterScript(client, _REFUND)

    def admit(self, token: str, key: dict, model, has_body: bool, now: float | None = None) -> ModelSlot | None:
        """Count the request against its model's limits or raise (429 rate, 400 budget). None when
        no per-model limit names the model."""
        if not applies(key) or not has_body:
            return None
        if not isinstance(model, str):
            raise GatewayError(403, "this key has per-model limits and the request's model could not be read "
                                    "from its body", "key_model_access_denied", param="model")
        rpm_limit = (key.get("model_rpm_limit") or {}).get(model)
        tpm_limit = (key.get("model_tpm_limit") or {}).get(model)
        budget = _budget_of(key, model)
        if rpm_limit is None and tpm_limit is None and budget is None:
            return None
        now = time.time() if now is None else now
        window = int(now // 60)
        period = int(now // budget[1]) if budget else 0
        keys = [self.names.model_limit(token, model, "rpm", window),
                self.names.model_limit(token, model, "tpm", window),
                self.names.model_limit(token, model, "spend", period)]
        args = [_limit(rpm_limit), _limit(tpm_limit), budget[0] if budget else -1]
        try:
            verdict, used = self._admit(keys=keys, args=args)
        except REDIS_ERRORS:
            raise unavailable() from None
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "ok":
            return ModelSlot(keys[0] if rpm_limit is not None else None)
        raise _refusal(verdict, model, int(float(used)), rpm_limit, tpm_limit, budget, now)

    def refund(self, slot: ModelSlot | None) -> None:
        """Give the request's rpm count back (a later check refused it); never raises."""
        if slot is None or slot.rpm_name is None:
            return
        name, slot.rpm_name = slot.rpm_name, None
        try:
            self._refund(keys=[name], args=[])
        except REDIS_ERRORS:
            pass  # the window ends within a minute: a lost refund costs one count for that long


def _limit(value) -> int:
    return -1 if value is None else int(value)


def _refusal(verdict: str, model: str, used: int, rpm_limit, tpm_limit, budget, now: float) -> GatewayError:
    """The error for a refused verdict: 429 with Retry-After for rates, 400 budget_exceeded."""
    if verdict == "budget":
        limit, seconds = budget
        resets = (int(now // seconds) + 1) * seconds
        return GatewayError(400, f"Budget has been exceeded for model {model!r}: spend {usd_text(used)} >= "
                                 f"model_max_budget {usd_text(limit)} (resets in {math.ceil(resets - now)}s)",
                            "budget_exceeded", param="model")
    retry = max(1, math.ceil(60 - now % 60))
    what = {"rpm": f"model_rpm_limit of {rpm_limit} requests per minute",
            "tpm": f"model_tpm_limit of {tpm_limit} tokens per minute"}[verdict]
    return GatewayError(429, f"Rate limit reached for this key on model {model!r}: {what}; retry in {retry}s",
                        "rate_limit_error", headers={"Retry-After": str(retry)}, kind=verdict)


def queue_usage(pipe, names, entry: dict, key: dict | None) -> None:
    """Queue a settled request's tokens (model_tpm_limit) and cost (model_max_budget) on an
    accounting pipeline, for the model it ran on. Queued again when a failed batch is retried,
    as the key's tpm is: an outage (nothing written) loses nothing."""
    model, token = entry.get("model"), entry.get("token")
    if key is None or not token or not isinstance(model, str) or not applies(key):
        return
    if (key.get("model_tpm_limit") or {}).get(model) is not None:
        tokens = (entry.get("prompt_tokens") or 0) + (entry.get("completion_tokens") or 0)
        if tokens > 0:
            name = names.model_limit(token, model, "tpm", int(entry["end_time"] // 60))
            pipe.incrby(name, tokens)
            pipe.expire(name, 120)
    budget = _budget_of(key, model)
    nanos = to_nanos(entry.get("spend") or 0)
    if budget is not None and nanos > 0:
        seconds = budget[1]
        name = names.model_limit(token, model, "spend", int(entry["start_time"] // seconds))
        pipe.incrby(name, nanos)
        pipe.expire(name, seconds + BUDGET_MARGIN_SECONDS)


def remaining(client, names, token: str, key: dict, now: float | None = None) -> dict | None:
    """What each limited model has left, for the key's holder (GET /key/info `limits.models`):
    {model: {"rpm", "tpm", "budget"}}, each None when the model has no such limit; None when the
    key has no per-model limit. One pipelined round trip."""
    if not applies(key):
        return None
    now = time.time() if now is None else now
    window = int(now // 60)
    models = sorted({*(key.get("model_rpm_limit") or {}), *(key.get("model_tpm_limit") or {}),
                     *(key.get("model_max_budget") or {})})
    pipe = client.pipeline(transaction=False)
    for model in models:
        budget = _budget_of(key, model)
        pipe.get(names.model_limit(token, model, "rpm", window))
        pipe.get(names.model_limit(token, model, "tpm", window))
        pipe.get(names.model_limit(token, model, "spend", int(now // budget[1]) if budget else 0))
    replies = pipe.execute()
    return {model: _model_remaining(key, model, replies[3 * i:3 * i + 3], window) for i, model in enumerate(models)}


def _model_remaining(key: dict, model: str, replies: list, window: int) -> dict:
    rpm, tpm, spent = (int(r or 0) for r in replies)
    resets_at = iso((window + 1) * 60)

    def minute(limit, used):
        if limit is None:
            return None
        return {"limit": limit, "used": used, "remaining": max(limit - used, 0), "resets_at": resets_at}

    budget = _budget_of(key, model)
    shown = None
    if budget is not None:
        limit, seconds = budget
        period = int(window * 60 // seconds)
        shown = {"limit": as_json(limit), "spend": as_json(spent), "remaining": as_json(max(limit - spent, 0)),
                 "resets_at": iso((period + 1) * seconds)}
    return {"rpm": minute((key.get("model_rpm_limit") or {}).get(model), rpm),
            "tpm": minute((key.get("model_tpm_limit") or {}).get(model), tpm), "budget": shown}
