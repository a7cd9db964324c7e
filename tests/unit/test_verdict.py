"""`stepwise verify`'s arithmetic: the factorings chosen for E, the tolerance, the first divergence."""

from __future__ import annotations

import pytest

from stepwise.contract.verdict import (
    FLOAT64_EPS,
    Factoring,
    StepDifference,
    factorings,
    first_divergence,
    tolerance,
)


@pytest.mark.parametrize("effective,expected", [
    (32, ["32 x 1 x 1", "16 x 2 x 1", "8 x 2 x 2 (ddp)"]),
    (6, ["6 x 1 x 1", "3 x 2 x 1", "3 x 1 x 2 (ddp)"]),  # E/2 odd: no accumulation under DDP
    (9, ["9 x 1 x 1", "3 x 3 x 1"]),  # odd: no two processes
    (7, ["7 x 1 x 1", "1 x 7 x 1"]),
    (1, ["1 x 1 x 1"]),
])
def test_the_factorings_of_e(effective, expected):
    chosen = factorings(effective)
    assert [str(f) for f in chosen] == expected
    assert all(f.batch_size * f.accum * f.world_size == effective for f in chosen)
    assert [str(f) for f in factorings(effective, ddp=False)] == [
        e for e in expected if "ddp" not in e]


def test_the_tolerance_grows_with_the_steps():
    assert tolerance(1) == 4096 * FLOAT64_EPS and tolerance(3) == 3 * tolerance(1)
    assert Factoring(8, 2, 2).mode == "ddp" and Factoring(8, 2, 1).mode == "single"


def test_the_first_divergence_is_the_earliest_step_then_the_first_factoring():
    ok = StepDifference(1, 0.0, 1e-17, 1e-17)
    late = StepDifference(2, 0.0, 1e-3, 1e-3, [{"name": "0.weight"}])
    early = StepDifference(1, 1e-5, 1e-4, 1e-4, [{"name": "1.weight"}])
    assert first_divergence({"a": [ok], "b": [ok]}) is None
    found = first_divergence({"a": [ok, late], "b": [early]})
    assert (found.step, found.factoring, found.parameters) == (1, "b", [{"name": "1.weight"}])
    # the loss alone is enough to disagree
    assert not StepDifference(1, 2 * tolerance(1), 0.0, 0.0).agrees
