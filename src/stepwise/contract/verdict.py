"""`stepwise verify`'s arithmetic: which factorings of E to run, the float64 tolerance, and the
verdict from the differences measured after each step (pure: the tensors are compared in
stepwise/run/verification.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FLOAT64_EPS = 2.0 ** -52
# Reordered float64 sums (another b, k or W adds the same terms in another order) differ by a
# few eps per operation; over a step's forward, backward and update that grows with the depth
# of the model and the size of the window, far below this. A dependence on the batch split
# (BatchNorm's statistics, dropout's draws, padding) shows at 1e-6 and above.
EPS_PER_STEP = 4096


@dataclass(frozen=True)
class Factoring:
    """b x k x W = E."""

    batch_size: int
    accum: int
    world_size: int

    @property
    def mode(self) -> str:
        return "ddp" if self.world_size > 1 else "single"

    def __str__(self) -> str:
        return (f"{self.batch_size} x {self.accum} x {self.world_size}"
                + (" (ddp)" if self.world_size > 1 else ""))


def factorings(effective: int, ddp: bool = True) -> list[Factoring]:
    """(E, 1, 1) first (the reference), then one with accumulation (E/k, k, 1) for the smallest
    k > 1 dividing E, then, with `ddp` and E even, two DDP processes (E/4, 2, 2), or (E/2, 1, 2)
    when E/2 is odd. E = 1 has no other factoring."""
    found = [Factoring(effective, 1, 1)]
    divisor = next((k for k in range(2, effective + 1) if effective % k == 0), None)
    if divisor is not None:
        found.append(Factoring(effective // divisor, divisor, 1))
    if ddp and effective % 2 == 0:
        half = effective // 2
        found.append(Factoring(half // 2, 2, 2) if half % 2 == 0 else Factoring(half, 1, 2))
    return found


def tolerance(step: int) -> float:
    """The largest difference of a value that is float64 rounding after `step` steps, relative
    to 1 + |value|."""
    return EPS_PER_STEP * FLOAT64_EPS * step


@dataclass
class StepDifference:
    """One factoring's step against the reference's: the window's loss and the parameters."""

    step: int
    loss: float  # |loss - reference loss| / (1 + |reference loss|)
    max_abs: float  # the largest |parameter - reference| over all parameters
    max_rel: float  # the largest of it relative to 1 + |reference|
    first: list[dict] = field(default_factory=list)  # parameters beyond the tolerance, in forward order

    @property
    def agrees(self) -> bool:
        limit = tolerance(self.step)
        return self.loss <= limit and self.max_rel <= limit


@dataclass
class Divergence:
    """Where runs first disagree: the step, the factoring, the parameters (forward order)."""

    step: int
    factoring: str
    loss: float
    parameters: list[dict]


def first_divergence(runs: dict[str, list[StepDifference]]) -> Divergence | None:
    """The earliest step at which some factoring leaves the tolerance (None: every step agrees);
    among factorings diverging at that step, the first in `runs`' order."""
    steps = sorted({d.step for differences in runs.values() for d in differences})
    for step in steps:
        for name, differences in runs.items():
            for difference in differences:
                if difference.step == step and not difference.agrees:
                    return Divergence(step, name, difference.loss, difference.first)
    return None


def as_json(runs: dict[str, list[StepDifference]]) -> dict[str, list[dict]]:
    return {name: [asdict(d) | {"agrees": d.agrees, "tolerance": tolerance(d.step)}
                   for d in differences] for name, differences in runs.items()}
