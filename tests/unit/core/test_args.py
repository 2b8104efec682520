"""The one query-argument parser of the admin routes (blueprints/args.py), issue 12 point 19."""
import pytest
from flask import Flask

from blueprints.args import bool_arg, int_arg, only_args, time_arg, time_range
from gateway.core.errors import GatewayError

app = Flask(__name__)


def parsed(query: str, fn, *args):
    with app.test_request_context("/?" + query):
        return fn(*args)


def refused(query: str, fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        parsed(query, fn, *args)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("raw", ["%C2%B2", "%D9%A3", "1_0", "+1", "-1", "%201", "1.0", "1e3", "0x10", "0", "101",
                                 "9" * 40])
def test_only_ascii_whole_numbers_in_range(raw):
    error = refused(f"page={raw}", int_arg, "page", 1, 1, 100)
    assert error.param == "page" and "from 1 to 100" in error.message


@pytest.mark.parametrize("query, value", [("", 7), ("page=", 7), ("page=1", 1), ("page=100", 100), ("page=042", 42)])
def test_whole_numbers_and_the_default(query, value):
    assert parsed(query, int_arg, "page", 7, 1, 100) == value


def test_unknown_arguments_are_named():
    assert parsed("page=1&size=2", only_args, "page", "size") is None
    error = refused("page=1&key_alais=x", only_args, "page", "size")
    assert error.param == "key_alais" and "page, size" in error.message


@pytest.mark.parametrize("query, value", [("", False), ("full=true", True), ("full=1", True), ("full=FALSE", False)])
def test_bool(query, value):
    assert parsed(query, bool_arg, "full") is value
    assert refused("full=yes", bool_arg, "full").param == "full"


@pytest.mark.parametrize("raw, epoch", [("0", 0.0), ("1700000000.5", 1700000000.5), ("2026-01-31", 1769817600.0),
                                        ("2026-01-31T12:00:00Z", 1769860800.0), ("2026-01-31T13:00:00%2B01:00", 1769860800.0)])
def test_times(raw, epoch):
    assert parsed(f"t={raw}", time_arg, "t") == epoch


@pytest.mark.parametrize("raw", ["nan", "inf", "1e9", "%D9%A3", "soon", "-5", "2026-13-01"])
def test_bad_times(raw):
    assert refused(f"t={raw}", time_arg, "t").param == "t"


def test_a_range_must_not_run_backwards():
    assert parsed("start_date=1&end_date=2", time_range) == (1.0, 2.0)
    assert refused("start_date=3&end_date=2", time_range).param == "start_date"
