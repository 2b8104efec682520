"""Team field validation: LiteLLM's names, exact money, unsupported fields refused by name."""
import pytest

from gateway.core.errors import GatewayError
from gateway.teams.fields import team_id_field, validate_team


def test_supported_fields_are_kept():
    fields = validate_team({"team_id": "x", "team_alias": "r", "models": ["m"], "max_budget": 1.5, "soft_budget": 1,
                            "budget_duration": "30d", "rpm_limit": 3, "tpm_limit": 4, "max_parallel_requests": 2,
                            "blocked": True, "metadata": {"a": 1}, "tags": ["t"]})
    assert fields["max_budget"] == 1.5 and fields["rpm_limit"] == 3 and "team_id" not in fields


@pytest.mark.parametrize("payload, param", [
    ({"members_with_roles": [{"role": "admin"}]}, "members_with_roles"),
    ({"organization_id": "o"}, "organization_id"),
    ({"max_budget": -1}, "max_budget"),
    ({"soft_budget": "1"}, "soft_budget"),
    ({"rpm_limit": 1.5}, "rpm_limit"),
    ({"nonsense": 1}, "nonsense"),
])
def test_bad_fields_name_themselves(payload, param):
    with pytest.raises(GatewayError) as refused:
        validate_team(payload)
    assert refused.value.status == 400 and refused.value.param == param


@pytest.mark.parametrize("team_id", ["", "a b", "a{b}", "x" * 129, "-lead", 5, None])
def test_team_ids_that_cannot_be_part_of_a_redis_name_are_refused(team_id):
    with pytest.raises(GatewayError):
        team_id_field(team_id)


def test_a_uuid_is_a_team_id():
    assert team_id_field("0b9c7d6e-1f2a-4b3c-8d4e-5f6a7b8c9d0e")
