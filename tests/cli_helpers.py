"""Helpers shared by the CLI tests (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from zoocli.cli import app


def run(*args, code=0):
    """Invoke `zoo ARGS...` in-process and check the exit code."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def run_json(*args):
    return json.loads(run(*args, "--json").stdout)


def one_line_error(res, *needles):
    """The failure was one line on stderr holding every needle, and no traceback."""
    err = res.stderr.strip()
    assert "Traceback" not in res.stdout + res.stderr
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
