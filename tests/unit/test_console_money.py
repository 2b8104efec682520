"""The console's money helpers (blueprints/console/static/dom.js), run in Node when it is there:
amounts shown to the nano-dollar, sums added in whole nano-dollars so tables and CSV totals
print exactly (0.1 + 0.2 is 0.3). The browser tests cover the pages themselves."""
import json
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

DOM = ROOT / "blueprints" / "console" / "static" / "dom.js"


def run_js(expression: str):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = f"import * as dom from {json.dumps(DOM.as_uri())}; console.log(JSON.stringify({expression}));"
    done = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_money_sums_print_exactly():
    sums = run_js("[dom.addMoney(0.1, 0.2), [0.013, 0.013, 0.013, 0.013, 0.013, 0.013, 0.013, 0.013, 0.013, 0.013,"
                  " 0.013].reduce(dom.addMoney, 0), [0.00000601, 0.00000601, 0.00000601].reduce(dom.addMoney, 0),"
                  " dom.addMoney(null, 0.051), dom.addMoney(undefined, undefined)].map(String)")
    assert sums == ["0.3", "0.143", "0.00001803", "0.051", "0"]


def test_money_is_shown_to_the_nano_dollar():
    shown = run_js("[dom.fmtMoney(0.00000015), dom.fmtMoney(1234.5), dom.fmtMoney(0.051), dom.fmtMoney(12.000000001),"
                   " dom.fmtMoney(null)]")
    assert shown == ["0.00000015", "1,234.50", "0.051", "12.000000001", "—"]
