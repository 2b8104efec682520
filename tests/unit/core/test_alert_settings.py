"""Budget-alert settings: off by default, refused in one line naming the setting (never its value)."""
import json
import subprocess
import sys
from fractions import Fraction

import pytest

from gateway.core.config import ConfigError, load_settings
from tests.conftest import ROOT

BASE = {"HOSTED_VLLM_API_BASE": "http://127.0.0.1:9", "LITELLM_MASTER_KEY": "sk-" + "m" * 30,
        "ALLOW_EPHEMERAL_KEYSTORE": "1"}
ON = {**BASE, "ALERT_WEBHOOK_URL": "https://hooks.example.com/x?token=hidden", "ALERT_WEBHOOK_SECRET": "s" * 32}


def test_off_by_default_with_default_thresholds():
    settings = load_settings(BASE)
    assert settings.alert_webhook_url is None
    assert settings.budget_alert_thresholds == (Fraction(1, 2), Fraction(4, 5), Fraction(1))


def test_on_with_durations_and_percentages():
    settings = load_settings({**ON, "ALERT_WEBHOOK_MAX_AGE": "2h", "BUDGET_ALERT_THRESHOLDS": "90%,50%"})
    assert settings.alert_webhook_max_age == 7200 and settings.budget_alert_thresholds == (Fraction(1, 2), Fraction(9, 10))
    assert "hidden" not in repr(settings) and "s" * 32 not in repr(settings)
    assert load_settings({**ON, "BUDGET_ALERT_THRESHOLDS": ""}).budget_alert_thresholds == ()


@pytest.mark.parametrize("extra, setting", [
    ({"ALERT_WEBHOOK_URL": "ftp://h/secret-path"}, "ALERT_WEBHOOK_URL"),
    ({"ALERT_WEBHOOK_SECRET": "short"}, "ALERT_WEBHOOK_SECRET"),
    ({"BUDGET_ALERT_THRESHOLDS": "150%"}, "BUDGET_ALERT_THRESHOLDS"),
    ({"ALERT_WEBHOOK_MAX_ATTEMPTS": "0"}, "ALERT_WEBHOOK_MAX_ATTEMPTS"),
    ({"ALERT_WEBHOOK_MAX_AGE": "8d"}, "ALERT_WEBHOOK_MAX_AGE"),
    ({"ALERT_WEBHOOK_LEASE": "5"}, "ALERT_WEBHOOK_LEASE"),
    ({"ALERT_OUTBOX_MAX": "0"}, "ALERT_OUTBOX_MAX"),
])
def test_bad_values_are_refused_naming_the_setting(extra, setting):
    with pytest.raises(ConfigError) as refused:
        load_settings({**ON, **extra})
    assert setting in str(refused.value) and "secret-path" not in str(refused.value)


def test_reading_the_settings_does_not_import_requests():
    """gunicorn's master reads them before gevent patches the workers: checked in a fresh
    interpreter (this test process imported requests long ago)."""
    script = ("import json, sys; from gateway.core.config import load_settings; "
              f"load_settings(json.loads({json.dumps(json.dumps(ON))})); "
              "assert 'requests' not in sys.modules, 'requests was imported'")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
