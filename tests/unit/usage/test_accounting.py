"""gateway.usage.accounting: batches kept through a Redis outage and not retried forever on a bug
(the spend log's own tests are in test_spendlog.py)."""
import redis

from tests.unit.usage.conftest import entry


def test_an_outage_reply_keeps_the_batch_and_a_bug_drops_it(accounting, monkeypatch):
    def failing_with(exc):
        def execute(self, *args, **kwargs):
            raise exc
        monkeypatch.setattr(type(accounting.redis.pipeline()), "execute", execute)

    failing_with(redis.exceptions.ReadOnlyError("You can't write against a read only replica."))
    accounting.record(entry(), None)
    assert len(accounting.pending) == 1
    failing_with(redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    accounting.flush()
    assert len(accounting.pending) == 0
