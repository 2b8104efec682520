"""Admin routes parse query arguments one way (issue 12, point 19): no 500 on '²', and an
unknown filter is a 400 naming it instead of a silent "everything"."""
import pytest

from tests.conftest import MASTER
from tests.test_keys import gen


@pytest.mark.parametrize("path", ["/spend/logs?page=²", "/spend/logs?size=²", "/key/list?page=²",
                                  "/key/list?size=٣", "/audit/logs?page=²"])
def test_odd_digits_are_a_400_not_a_500(kclient, path):
    resp = kclient.get(path, headers=MASTER)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == path.split("?")[1].split("=")[0]


@pytest.mark.parametrize("path, param", [
    ("/spend/logs?user=alice", "user"), ("/spend/logs?key_alais=x", "key_alais"),
    ("/key/list?alias=x", "alias"), ("/key/list?page=1&team=t", "team"), ("/key/info?key=x&verbose=1", "verbose"),
])
def test_unknown_filters_are_refused_by_name(kclient, path, param):
    gen(kclient, key_alias="x")
    resp = kclient.get(path, headers=MASTER)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["param"] == param and param in error["message"]


def test_known_filters_still_work(kclient):
    kclient.post("/team/new", headers=MASTER, json={"team_id": "t"})
    gen(kclient, key_alias="x", team_id="t")
    gen(kclient, key_alias="y")
    listed = kclient.get("/key/list?team_id=t&page=1&size=5&return_full_object=true", headers=MASTER).get_json()
    assert [k["key_alias"] for k in listed["keys"]] == ["x"]
    assert kclient.get("/spend/logs?api_key=sk-x&end_user_id=u&page=1&size=5&start_date=2020-01-01",
                       headers=MASTER).status_code == 200
