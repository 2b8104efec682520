"""gateway.core.redisconn: which errors are outages, what the operator is told, and how often."""
import logging
import ssl

import pytest
import redis

from gateway.core.redisconn import REDIS_ERRORS, ConnectionBudget, Incidents, classify, unavailable

E = redis.exceptions
BUDGET = ConnectionBudget(pool_size=8, workers=2, socket_timeout=2.0)


@pytest.mark.parametrize("exc,words", [
    (E.ConnectionError("max number of clients reached"),
     ["2 workers × REDIS_POOL_SIZE 8 = 16", "lower REDIS_POOL_SIZE"]),
    (E.ConnectionError("Error 1 connecting to redis:6380. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
                       "failed"), ["TLS", "REDIS_SSL_CERT_REQS"]),
    (ssl.SSLError("wrong version number"), ["TLS", "REDIS_URL"]),
    (E.ConnectionError("No connection available."), ["REDIS_POOL_TIMEOUT", "REDIS_POOL_SIZE"]),
    (E.TimeoutError("Timeout reading from socket"), ["2.0s", "REDIS_SOCKET_TIMEOUT"]),
    (E.AuthenticationError("invalid username-password pair"), ["credentials", "REDIS_URL"]),
    (E.ConnectionError("Error 111 connecting to 127.0.0.1:6380. Connection refused."), ["unreachable", "REDIS_URL"]),
])
def test_each_outage_names_its_cause_and_the_setting_to_fix(exc, words):
    assert isinstance(exc, REDIS_ERRORS)
    cause, fix = classify(exc, BUDGET)
    for word in words:
        assert word in cause + fix


@pytest.mark.parametrize("exc", [E.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
                                 E.ResponseError("user_script:1: Script attempted to access nonexistent global"),
                                 E.DataError("Invalid input of type: 'NoneType'")])
def test_a_bug_is_not_an_outage(exc):
    assert not isinstance(exc, REDIS_ERRORS)


def test_one_line_per_incident_and_one_when_it_ends(caplog):
    incidents = Incidents()
    with caplog.at_level(logging.WARNING, logger="gateway"):
        for _ in range(50):
            incidents.report(E.ReadOnlyError("You can't write against a read only replica."))
        incidents.report(E.ConnectionError("Connection refused"))  # a new cause: a new line
        incidents.answered()
        incidents.answered()
        incidents.report(E.ConnectionError("Connection refused"))  # a new incident
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "READONLY" in lines[0] and "unreachable" in lines[1] and "answers again" in lines[2]


def test_unavailable_reports_the_active_exception(caplog, monkeypatch):
    from gateway.core import redisconn

    monkeypatch.setattr(redisconn, "incidents", Incidents())
    with caplog.at_level(logging.WARNING, logger="gateway"):
        for _ in range(3):
            try:
                raise E.BusyLoadingError("Redis is loading the dataset in memory")
            except REDIS_ERRORS:
                error = unavailable()
    assert error.status == 503
    assert [r.getMessage()[:40] for r in caplog.records] == ["Redis is loading its data set (LOADING) "]
