"""A legal value that is almost certainly a slip: one WARNING line naming key, value and fix, in
a dry run too; the run goes on (exit 0) and the plan keeps the line (plan.json, its table)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.unit.test_advice import ACCUM_64

pytestmark = pytest.mark.cli


@pytest.mark.smoke
def test_a_dry_run_warns_and_goes_on(workdir):
    proc = run_cli("dry_run=true", "accum=64", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    warnings = [line.split("[WARNING] - ", 1)[1] for line in output.splitlines()
                if "[stepwise][WARNING] - " in line]
    assert tuple(warnings) == ACCUM_64, output
    assert "lr per sample                   1/64 of that at base_batch_size=32 (E=2048, " \
           "lr_scaling=none)" in output
    assert "dry_run=true: stopping before training" in output
    [plan_json] = workdir.glob("outputs/*/*/plan.json")
    assert json.loads(plan_json.read_text())["warnings"] == warnings
