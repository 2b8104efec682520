"""The audit log of admin changes, GET /audit/logs, and `caller` on admin routes (issue 12, point 2)."""
import json

import pytest

from gateway.keys import audit
from tests.conftest import MASTER
from tests.test_keys import all_redis_text, gen

CUSTOM = "sk-custom-audit-secret-0001"
NEW_CUSTOM = "sk-custom-audit-secret-0002"


def logs(client, **query):
    resp = client.get("/audit/logs", headers=MASTER, query_string=query)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def every_change(client):
    """One of each admin change; returns the keys involved."""
    a = gen(client, key_alias="aud", key=CUSTOM, rpm_limit=3)
    client.post("/key/update", headers=MASTER, json={"key_alias": "aud", "tpm_limit": 100})
    client.post("/key/block", headers=MASTER, json={"key_alias": "aud"})
    client.post("/key/unblock", headers=MASTER, json={"key": a["key"]})
    b = client.post("/key/regenerate", headers=MASTER,
                    json={"key": CUSTOM, "new_key": NEW_CUSTOM, "grace_period": "1h"}).get_json()
    client.post("/key/delete", headers=MASTER, json={"key_aliases": ["aud"]})
    return a, b


def test_every_admin_change_is_recorded_newest_first(kclient):
    a, b = every_change(kclient)
    entries = logs(kclient)["logs"]
    assert [e["action"] for e in entries] == ["delete", "regenerate", "unblock", "block", "update", "generate"]
    assert all(e["caller"] == "master" and e["key_alias"] == "aud" and e["time"].endswith("Z") for e in entries)
    by_action = {e["action"]: e for e in entries}
    assert by_action["generate"]["token"] == a["token"] and by_action["generate"]["custom_key"] is True
    assert by_action["generate"]["changes"]["rpm_limit"] == 3 and "key" not in by_action["generate"]["changes"]
    assert by_action["update"]["changes"] == {"tpm_limit": 100}
    assert by_action["block"]["changes"] == {"blocked": True}
    assert by_action["regenerate"]["token"] == b["token"] and by_action["regenerate"]["previous_token"] == a["token"]
    assert by_action["regenerate"]["changes"] == {"grace_period": 3600}
    assert by_action["delete"]["token"] == b["token"] and by_action["delete"]["previous_tokens"] == [a["token"]]


def test_no_plaintext_key_is_recorded(kclient, redis_client):
    every_change(kclient)
    stored = all_redis_text(redis_client) + json.dumps(redis_client.xrange(redis_client.test_prefix + "audit"))
    assert "generate" in stored
    assert CUSTOM not in stored and NEW_CUSTOM not in stored
    assert CUSTOM not in json.dumps(logs(kclient))


def test_filters_and_paging(kclient):
    a = gen(kclient, key_alias="one")
    gen(kclient, key_alias="two")
    kclient.post("/key/block", headers=MASTER, json={"key_alias": "one"})
    assert [e["action"] for e in logs(kclient, key_alias="one")["logs"]] == ["block", "generate"]
    assert [e["key_alias"] for e in logs(kclient, action="generate")["logs"]] == ["two", "one"]
    assert logs(kclient, key=a["key"])["total_count"] == 2 and logs(kclient, key=a["token"])["total_count"] == 2
    page = logs(kclient, size=1, page=2)
    assert page["total_count"] == 3 and page["total_pages"] == 3 and page["logs"][0]["key_alias"] == "two"
    newest = logs(kclient)["logs"][0]["time"]
    assert logs(kclient, start_date=newest)["total_count"] >= 1
    assert logs(kclient, end_date="2000-01-01")["total_count"] == 0


@pytest.mark.parametrize("query, param", [
    ({"action": "explode"}, "action"), ({"token_alias": "x"}, "token_alias"), ({"page": "²"}, "page"),
    ({"start_date": "soon"}, "start_date"), ({"start_date": "2030-01-01", "end_date": "2020-01-01"}, "start_date"),
])
def test_bad_queries_name_the_argument(kclient, query, param):
    resp = kclient.get("/audit/logs", headers=MASTER, query_string=query)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param


def test_only_the_master_key_reads_the_log(kclient):
    created = gen(kclient)
    resp = kclient.get("/audit/logs", headers={"Authorization": f"Bearer {created['key']}"})
    assert resp.status_code == 403
    assert kclient.get("/audit/logs").status_code == 401


def test_big_values_are_noted_not_stored(kclient):
    gen(kclient, metadata={"notes": "x" * 5000})
    changes = logs(kclient)["logs"][0]["changes"]
    assert changes["metadata"].startswith("<") and "characters, not recorded" in changes["metadata"]


def test_the_log_is_bounded(redis_client, monkeypatch):
    from gateway.core.redisnames import RedisNames

    monkeypatch.setattr(audit, "MAX_ENTRIES", 5)
    log = audit.AuditLog(redis_client, RedisNames(redis_client.test_prefix))
    for n in range(300):
        log.add(redis_client, "update", "master", {"token": f"t{n}"})
    # Approximate trimming removes whole stream nodes (100 entries each by default).
    assert redis_client.xlen(log.stream) <= 5 + 100
    assert log.query(size=1)["logs"][0]["token"] == "t299"


@pytest.mark.parametrize("path", ["/key/list", "/spend/logs", "/audit/logs", "/end_user/info?end_user_id=x"])
def test_admin_routes_name_the_caller_in_the_access_log(kclient, capfd, path):
    capfd.readouterr()
    kclient.get(path, headers=MASTER)
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["caller"] for line in lines if line["path"] == path.split("?")[0]] == ["master"]
