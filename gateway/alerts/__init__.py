"""Budget alerts: thresholds crossed by a settle, fired once per threshold per budget period,
delivered to a webhook, signed, from a durable outbox in Redis.

- thresholds: which levels (50% / 80% / 100% of max_budget, soft_budget) a settle crossed; pure.
- once: the gate (marker + outbox in one script) and the Redis names.
- webhook: the event body, the outbox, the signature and the per-worker deliverer.

A counter hook `count(outcome, n=1)` may be passed to the gate and the deliverer; outcomes:
queued, lost (Redis down at the crossing), overflow (outbox full), delivered, retried, dropped.
"""
from gateway.alerts.thresholds import NANO_USD, Budget, Crossing, crossings, parse_thresholds

# The gate and the deliverer import `requests`, which gateway/core/config.py (read in the gunicorn
# master, before gevent patches the workers) must not: they load on first use, so the settings
# can parse BUDGET_ALERT_THRESHOLDS with `thresholds` alone.
_LAZY = {"AlertNames": "once", "OnceGate": "once", "DeliveryPolicy": "webhook", "Deliverer": "webhook",
         "Outbox": "webhook", "verify_signature": "webhook"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"gateway.alerts.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'gateway.alerts' has no attribute {name!r}")

# Every outcome the counter hook is called with (for a metric created at 0 for each, at start-up).
OUTCOMES = ("queued", "lost", "overflow", "delivered", "retried", "dropped")

__all__ = ["NANO_USD", "OUTCOMES", "AlertNames", "Budget", "Crossing", "DeliveryPolicy", "Deliverer", "OnceGate", "Outbox",
           "crossings", "parse_thresholds", "verify_signature"]
