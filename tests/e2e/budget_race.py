"""Clients racing one budget until it runs out (tests/e2e/test_budget_fleet.py for a key,
test_team_fleet.py for a team): all start at once, retry a 429 (the budget held by requests in
flight, as the openai client does) and stop at the 400 budget_exceeded."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def race_to_budget(clients: int, target, body: dict, timeout: float = 60) -> list[int]:
    """Every status the clients got; `target(i, j)` gives client i's j-th (url, headers)."""
    start = threading.Barrier(clients)

    def client(i):
        statuses = []
        deadline = time.monotonic() + timeout
        with requests.Session() as session:
            start.wait()  # everyone at once: the race the reservation must win
            for j in range(10_000):
                url, headers = target(i, j)
                resp = session.post(url + "/vllm/v1/chat/completions", json={**CHAT, **body}, timeout=30,
                                    headers=headers)
                statuses.append(resp.status_code)
                if resp.status_code == 400:
                    assert resp.json()["error"]["type"] == "budget_exceeded"
                    break  # spent
                if resp.status_code == 429:
                    assert resp.headers["Retry-After"] == "1"
                    time.sleep(0.02)  # the client's back-off (shortened), not a synchronisation
                assert time.monotonic() < deadline, f"the budget never ran out: {statuses[-5:]} {resp.text[:300]}"
        return statuses

    with ThreadPoolExecutor(clients) as pool:
        statuses = [s for batch in pool.map(client, range(clients)) for s in batch]
    assert statuses.count(400) == clients and set(statuses) <= {200, 400, 429}, set(statuses)
    return statuses
