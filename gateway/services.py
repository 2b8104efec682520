"""The per-worker services the views use, built once by the app factory (app.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from gateway.core.config import Settings
from gateway.core.metrics import Metrics
from gateway.keys.audit import AuditLog
from gateway.keys.auth import Authenticator
from gateway.keys.store import KeyStore
from gateway.relay.exchange import Passthrough
from gateway.relay.replicas import Replicas
from gateway.usage.accounting import Accounting
from gateway.usage.budgets import Budgets
from gateway.usage.limits import RateLimiter


@dataclass
class Services:
    settings: Settings
    redis: Any                  # redis.Redis, or an embedded fakeredis without REDIS_URL
    session: requests.Session   # the worker's one HTTP session to vLLM
    metrics: Metrics
    replicas: Replicas
    keystore: KeyStore
    audit: AuditLog             # who changed which key (the key store writes it)
    auth: Authenticator
    limiter: RateLimiter
    budgets: Budgets            # budget reservations at admission (settled by accounting)
    accounting: Accounting
    passthrough: Passthrough
    admission: Any = None       # the admission queue (gateway/relay/admission.py), None when off
    teams: Any = None           # gateway/teams/store.TeamStore (/team/* and a key's team at authentication)
    alerts: Any = None          # the budget-alert gate (gateway/alerts/once.OnceGate), None when alerts are off
    deliverer: Any = None       # this worker's webhook deliverer (gateway/alerts/webhook.Deliverer)
