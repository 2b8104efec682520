"""Budget alerts from settled charges: which budget, before/after from the settle's reply."""
from gateway.usage.accounting import Charge
from gateway.usage.budgetalerts import budget_of, fire_for_settled


class Gate:
    def __init__(self):
        self.calls = []

    def fire(self, budget, period, before, after, **kwargs):
        self.calls.append((budget.scope, budget.id, period, before, after))


def test_a_key_and_a_team_budget():
    key = budget_of("a" * 64, {"max_budget": 1.5, "key_alias": "k", "team_id": "t"})
    assert (key.scope, key.max_budget, key.team_id) == ("key", 1_500_000_000, "t")
    team = budget_of("team:t", {"team_id": "t", "soft_budget": 0.5, "team_alias": "r"})
    assert (team.scope, team.id, team.soft_budget, team.max_budget) == ("team", "t", 500_000_000, None)
    assert budget_of("a" * 64, {"max_budget": None}) is None


def test_only_charges_settled_in_their_current_period_alert():
    gate = Gate()
    owner = {"max_budget": 1.0, "created_epoch": 0}
    counted, over, retried, unknown = (Charge("a" * 64, "all", n, owner) for n in range(4))
    unknown.owner = None
    for charge in (counted, over, retried, unknown):
        charge.spend = 300
    fire_for_settled(gate, [counted, over, retried, unknown], [[1, "1000"], 1, 0, [1, "5"]])
    assert gate.calls == [("key", "a" * 64, "all", 700, 1000)]
