"""The step log: which steps are logged, when the device is read, what is sent, and the line."""

from __future__ import annotations

import logging

import pytest
import torch

from stepwise.contract.errors import NonFiniteLoss
from stepwise.contract.plan import make_plan
from stepwise.loop.item_tally import ItemTally
from stepwise.loop.step_log import StepLog, log_interval, peak_memory, progress_line
from stepwise.loop.trainer_parts import Counters, LoopSettings
from stepwise.parallel.replica import Replica
from stepwise.tracking.tracker import NullTracker

CPU = Replica("single", 0, 1, torch.device("cpu"))


class Recorder(NullTracker):
    """A tracker that keeps what it is given."""

    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}
        self.calls: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.setdefault(step, {}).update(metrics)
        self.calls.append((step, dict(metrics)))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("configured,total,every", [
    (None, 36, 1), (None, 135, 1), (None, 199, 1), (None, 200, 2), (None, 450, 4),
    (None, 100_000, 1000), (7, 450, 7), (50, 36, 50), (1, 450, 1)])
def test_log_interval(configured, total, every):
    assert log_interval(configured, total) == every


def test_auto_interval_gives_every_run_at_least_100_points_or_all_its_steps():
    for total in range(1, 5000):
        every = log_interval(None, total)
        points = sum(1 for s in range(1, total + 1) if s % every == 0 or s == total)
        assert min(total, 100) <= points <= 200, total


def test_progress_line():
    assert progress_line(120, 450, 0.41234, 5321.4, 41 / 330) == (
        "step 120/450 (27%) loss 0.4123 samples/s 5321 eta 0:00:41")
    assert progress_line(449, 450, 0.1, 10.0, 1.0) == (
        "step 449/450 (99%) loss 0.1000 samples/s 10 eta 0:00:01")
    assert progress_line(450, 450, 0.1, 10.0, 1.0).startswith("step 450/450 (100%)")


def test_peak_memory_on_cpu_is_the_process_peak_rss():
    [(name, mib)] = peak_memory(torch.device("cpu")).items()
    assert name == "train/peak_rss_mb"
    with open("/proc/self/status") as status:  # VmHWM: the same peak, in kB
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    assert mib == pytest.approx(hwm / 1024, rel=0.05)


def _drive(tmp_settings: LoopSettings, losses: dict[int, float], pause_at: int | None = None,
           lines: bool = False):
    """Train-loop calls for 1438 samples, b=32, 3 epochs (135 steps of about 0.01 s each)."""
    plan = make_plan(train_samples=1438, per_device_batch_size=32, accum=1, max_epochs=3)
    tracker, clock, counters = Recorder(), Clock(), Counters()
    log = StepLog(plan, CPU, tracker, ItemTally(CPU, None), tmp_settings, lines=lines,
                  clock=clock)
    log.start(counters)
    reads = []
    for step in range(1, plan.total_optimizer_steps + 1):
        clock.now += 0.01
        log.unchecked.append((step, torch.tensor(losses.get(step, step / 1000))))
        counters.global_step, counters.samples_seen = step, plan.samples_after(step)
        norm = torch.tensor(float(step)) if log.logs(step) else None
        if log.record(step, counters, lr=0.1, norm=norm):
            log.read(counters)
            reads.append(step)
        if step == pause_at:
            with log.paused():
                clock.now += 5.0  # an evaluation: not an optimizer step
    return plan, tracker, log, reads


def test_losses_are_read_only_at_flush_points_and_sent_for_every_logged_step():
    plan, tracker, log, reads = _drive(LoopSettings(), {}, pause_at=75)
    assert reads == [50, 100, 135] and log.reads == 3  # one copy to the host per read
    assert sorted(tracker.logged) == list(range(1, 136))  # auto: every step of 135
    for step, metrics in tracker.logged.items():
        assert metrics["train/loss"] == pytest.approx(step / 1000, abs=1e-7)
        assert metrics["train/grad_norm"] == step
        assert metrics["train/samples_seen"] == plan.samples_after(step)
        assert metrics["train/lr"] == 0.1
    # Throughput at each read, over the steps since the last one, the pause left out.
    throughput = {s: m for s, m in tracker.logged.items() if "train/step_time_s" in m}
    assert sorted(throughput) == [50, 100, 135]
    for metrics in throughput.values():
        assert metrics["train/step_time_s"] == pytest.approx(0.01)
        assert metrics["train/peak_rss_mb"] > 0
    # steps 1-50: 49 windows of 32 and the epoch's last, of 30 (1438 = 44 x 32 + 30)
    assert throughput[50]["train/samples_per_s"] == pytest.approx((49 * 32 + 30) / 0.5)
    samples = plan.samples_after(135) - plan.samples_after(100)  # 1 partial window of 30
    assert throughput[135]["train/samples_per_s"] == pytest.approx(samples / 0.35)


def test_an_explicit_interval_logs_its_multiples_and_reads_at_the_first_after_flush_every():
    _, tracker, _, reads = _drive(LoopSettings(log_every_n_steps=7), {})
    assert sorted(tracker.logged) == [*range(7, 135, 7), 135]
    assert reads == [56, 112, 135]
    _, tracker, _, reads = _drive(LoopSettings(log_every_n_steps=60), {})
    assert sorted(tracker.logged) == [60, 120, 135] and reads == [60, 120, 135]


def test_a_non_finite_loss_fails_at_the_next_read_naming_its_step():
    with pytest.raises(NonFiniteLoss, match="optimizer step 17 "):
        _drive(LoopSettings(), {17: float("nan"), 30: float("inf")})
    _, tracker, _, _ = _drive(LoopSettings(on_nonfinite="skip"), {17: float("nan")})
    assert tracker.logged[17]["train/loss"] != tracker.logged[17]["train/loss"]  # nan, logged


def test_the_progress_line_is_written_at_each_read(caplog):
    with caplog.at_level(logging.INFO, logger="stepwise"):
        _drive(LoopSettings(), {}, lines=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "stepwise.loop.step_log"]
    assert lines == ["step 50/135 (37%) loss 0.0500 samples/s 3196 eta 0:00:01",
                     "step 100/135 (74%) loss 0.1000 samples/s 3196 eta 0:00:00",
                     "step 135/135 (100%) loss 0.1350 samples/s 3194 eta 0:00:00"]


def test_evaluation_points_carry_samples_seen_and_epoch():
    plan = make_plan(train_samples=1438, per_device_batch_size=32, accum=1, max_epochs=3)
    tracker = Recorder()
    log = StepLog(plan, CPU, tracker, ItemTally(CPU, None), LoopSettings(log_every_n_steps=10),
                  lines=False)
    counters = Counters(global_step=45, samples_seen=1438)
    log.evaluation({"val/loss": 0.5}, counters, epoch=1.0)
    assert tracker.logged[45] == {"val/loss": 0.5, "epoch": 1.0, "train/samples_seen": 1438}
    log.unchecked.append((50, torch.tensor(0.25)))
    counters = Counters(global_step=50, samples_seen=1438 + 5 * 32)
    log.record(50, counters, lr=0.1)
    log.read(counters)
    log.evaluation({"val/loss": 0.4}, counters, epoch=50 / 45)
    # that step's train metrics have train/samples_seen already: not logged twice
    assert tracker.calls[-1] == (50, {"val/loss": 0.4, "epoch": 50 / 45})
    assert tracker.logged[50]["train/samples_seen"] == 1598
