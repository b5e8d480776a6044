"""README is the contract: CI (.ci/run) runs README's set-up line and test command exactly as
README writes them, before anything else is installed."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _quick_start_lines() -> tuple[str, str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    after = {c: block[i + 1] for i, c in enumerate(block) if c.startswith("# ")}
    setup = next(v for k, v in after.items() if k.startswith("# 1. set up"))
    tests = next(v for k, v in after.items() if k.startswith("# 3. the tests"))
    return setup, tests


def test_ci_runs_readme_setup_and_tests_first_and_verbatim():
    setup, tests = _quick_start_lines()
    assert setup.startswith("python3 -m pip install") and tests.startswith("python3 -m pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup in ci and tests in ci, (setup, tests)
    first_install = next(i for i, line in enumerate(ci) if "pip install" in line and not line.startswith("#")
                         and not line.startswith("PIP="))
    assert ci[first_install] == setup  # nothing is installed before README's line
    assert ci.index(tests) > ci.index(setup)
    # in a fresh venv: created and activated before README's line
    before = "\n".join(ci[:first_install])
    assert "python3 -m venv" in before and "/bin/activate" in before
