"""Teams (/team/*) and what a team imposes on its keys: budget, rate limits, models, blocking;
on fakeredis, the real Redis, a Redis Cluster and Sentinel (the `redis_client` topologies)."""

from gateway.keys.cache import KeyCache
from tests.conftest import MASTER

BOUNDED = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 10}
CHAT = "/vllm/v1/chat/completions"


def new_team(client, **fields):
    resp = client.post("/team/new", headers=MASTER, json=fields)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def team_key(client, team_id, **fields):
    resp = client.post("/key/generate", headers=MASTER, json={"team_id": team_id, **fields})
    assert resp.status_code == 200, resp.get_json()
    created = resp.get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def test_team_crud(kclient):
    team = new_team(kclient, team_alias="research", max_budget=0.1, rpm_limit=5, models=["fake-model"])
    team_id = team["team_id"]
    assert team["team_alias"] == "research" and team["max_budget"] == 0.1 and team["spend"] == 0
    same = new_team(kclient, team_id="ops-1")
    assert same["team_id"] == "ops-1"
    again = kclient.post("/team/new", headers=MASTER, json={"team_id": "ops-1"})
    assert again.status_code == 400 and again.get_json()["error"]["param"] == "team_id"

    info = kclient.get(f"/team/info?team_id={team_id}", headers=MASTER).get_json()
    assert info["team_id"] == team_id and info["keys"] == [] and info["team_info"]["key_count"] == 0
    assert info["team_info"]["limits"]["rpm"]["limit"] == 5

    updated = kclient.post("/team/update", headers=MASTER, json={"team_id": team_id, "rpm_limit": 7}).get_json()
    assert updated["rpm_limit"] == 7 and updated["team_alias"] == "research"
    listed = kclient.get("/team/list", headers=MASTER).get_json()
    assert {t["team_id"] for t in listed} == {team_id, "ops-1"}

    assert kclient.post("/team/delete", headers=MASTER, json={"team_ids": ["ops-1"]}).status_code == 200
    assert kclient.get("/team/info?team_id=ops-1", headers=MASTER).status_code == 404
    actions = [e["action"] for e in kclient.get("/audit/logs", headers=MASTER).get_json()["logs"]]
    assert actions[:3] == ["team_delete", "team_update", "team_new"]


def test_bad_team_input_is_a_clear_400(kclient):
    for body, param in (({"members_with_roles": []}, "members_with_roles"), ({"rpm_limit": -1}, "rpm_limit"),
                        ({"team_id": "a{b}"}, "team_id"), ({"max_budget": "x"}, "max_budget"),
                        ({"colour": "red"}, "colour")):
        resp = kclient.post("/team/new", headers=MASTER, json=body)
        assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param, body
    members = kclient.post("/team/new", headers=MASTER, json={"members_with_roles": []}).get_json()
    assert "not supported" in members["error"]["message"] and "/key/generate" in members["error"]["message"]
    assert kclient.get("/team/info", headers=MASTER).status_code == 400
    assert kclient.post("/team/update", headers=MASTER, json={"team_id": "nope"}).status_code == 404
    assert kclient.post("/team/new", data="{", headers={**MASTER, "Content-Type": "application/json"}).status_code == 400


def test_a_key_must_name_an_existing_team(kclient):
    resp = kclient.post("/key/generate", headers=MASTER, json={"team_id": "ghost"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "team_id"
    created = kclient.post("/key/generate", headers=MASTER, json={}).get_json()
    resp = kclient.post("/key/update", headers=MASTER, json={"key": created["key"], "team_id": "ghost"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "team_id"


def test_team_routes_need_the_master_key(kclient):
    team = new_team(kclient)
    _, auth = team_key(kclient, team["team_id"])
    assert kclient.get(f"/team/info?team_id={team['team_id']}", headers=auth).status_code == 403
    assert kclient.post("/team/new", headers=auth, json={}).status_code == 403


def test_a_team_budget_is_shared_by_its_keys(kclient):
    # 0.028 reserved a request, 0.013 charged: 0.05 admits two, then refuses whichever key asks.
    team = new_team(kclient, max_budget=0.05)
    _, first = team_key(kclient, team["team_id"])
    _, second = team_key(kclient, team["team_id"])
    assert kclient.post(CHAT, headers=first, json=BOUNDED).status_code == 200
    assert kclient.post(CHAT, headers=second, json=BOUNDED).status_code == 200
    refused = kclient.post(CHAT, headers=first, json=BOUNDED)
    assert refused.status_code == 400 and refused.get_json()["error"]["type"] == "budget_exceeded"
    assert refused.get_json()["error"]["message"].startswith(f"Team {team['team_id']}: Budget has been exceeded")
    info = kclient.get(f"/team/info?team_id={team['team_id']}", headers=MASTER).get_json()["team_info"]
    assert info["spend"] == 0.026 and info["total_spend"] == 0.026 and info["requests"] == 3  # a refused one counts, as for a key
    assert info["key_count"] == 2


def test_the_tighter_budget_wins(kclient):
    team = new_team(kclient, max_budget=10)
    _, auth = team_key(kclient, team["team_id"], max_budget=0.02)  # the key's own: 0.028 never fits
    assert kclient.post(CHAT, headers=auth, json=BOUNDED).status_code == 400


def test_team_rpm_counts_every_key_and_a_refusal_takes_nothing(kclient):
    team = new_team(kclient, rpm_limit=3)
    _, first = team_key(kclient, team["team_id"], rpm_limit=10)
    _, second = team_key(kclient, team["team_id"])
    assert kclient.post(CHAT, headers=first, json=BOUNDED).status_code == 200
    assert kclient.post(CHAT, headers=second, json=BOUNDED).status_code == 200
    assert kclient.post(CHAT, headers=first, json=BOUNDED).status_code == 200
    refused = kclient.post(CHAT, headers=first, json=BOUNDED)
    assert refused.status_code == 429 and "for this team" in refused.get_json()["error"]["message"]
    # the refused request's count on the key went back: 3 used of the key's 10
    info = kclient.get(f"/key/info", headers=first).get_json()["info"]
    assert info["limits"]["rpm"]["used"] == 2


def test_team_models_restrict_its_keys(kclient):
    team = new_team(kclient, models=["fake-model"])
    _, auth = team_key(kclient, team["team_id"])  # the key itself may use any model
    refused = kclient.post(CHAT, headers=auth, json={**BOUNDED, "model": "other"})
    assert refused.status_code == 403 and refused.get_json()["error"]["type"] == "team_model_access_denied"
    assert kclient.post(CHAT, headers=auth, json=BOUNDED).status_code == 200


def test_team_models_read_a_forms_model_too(kclient):
    team = new_team(kclient, models=["fake-model"])
    _, auth = team_key(kclient, team["team_id"])  # no models of its own: the team's list decides

    def form(model):
        return (f"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
                f"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n").encode()

    headers = {**auth, "Content-Type": "multipart/form-data; boundary=b"}
    assert kclient.post("/vllm/v1/audio/transcriptions", headers=headers, data=form("fake-model")).status_code == 200
    assert kclient.post("/vllm/v1/audio/transcriptions", headers=headers, data=form("whisper")).status_code == 403


def test_blocking_a_team_blocks_its_keys(kclient):
    team = new_team(kclient)
    _, auth = team_key(kclient, team["team_id"])
    assert kclient.post(CHAT, headers=auth, json=BOUNDED).status_code == 200
    # A worker's cache, as on gevent workers, holding entries a minute: only eviction on the
    # change can make the block (and the unblock) seen at once.
    keystore = kclient.application.extensions["gateway"].keystore
    keystore.cache = KeyCache(keystore.redis, keystore.names.key_changes, ttl=60)
    keystore.cache._listening = True  # no listener greenlet off gevent: this worker's evictions only
    assert kclient.post(CHAT, headers=auth, json=BOUNDED).status_code == 200  # key and team now cached
    assert kclient.post("/team/block", headers=MASTER, json={"team_id": team["team_id"]}).status_code == 200
    blocked = kclient.post(CHAT, headers=auth, json=BOUNDED)
    assert blocked.status_code == 401 and "team is blocked" in blocked.get_json()["error"]["message"]
    assert kclient.post("/team/unblock", headers=MASTER, json={"team_id": team["team_id"]}).status_code == 200
    assert kclient.post(CHAT, headers=auth, json=BOUNDED).status_code == 200


def test_deleting_a_team_with_keys_is_refused(kclient):
    team = new_team(kclient)
    created, _ = team_key(kclient, team["team_id"])
    resp = kclient.post("/team/delete", headers=MASTER, json={"team_ids": [team["team_id"]]})
    assert resp.status_code == 409 and "1 key" in resp.get_json()["error"]["message"]
    kclient.post("/key/update", headers=MASTER, json={"key": created["key"], "team_id": None})
    assert kclient.post("/team/delete", headers=MASTER, json={"team_ids": [team["team_id"]]}).status_code == 200


def test_spend_report_groups_by_team(kclient):
    team = new_team(kclient)
    _, auth = team_key(kclient, team["team_id"])
    assert kclient.post(CHAT, headers=auth, json=BOUNDED).status_code == 200
    report = kclient.get("/spend/report?group_by=team&interval=hour", headers=MASTER).get_json()
    series = {s["group"]: s for s in report["series"]}
    assert series[team["team_id"]]["totals"]["requests"] == 1
    assert series[team["team_id"]]["totals"]["spend"] == 0.013
