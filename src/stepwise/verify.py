"""`stepwise verify [the job's overrides] [verify.steps=3] [verify.log=false]`
(`python -m stepwise verify`, `python train.py verify`): does this job's training depend on how
its effective batch is split?

The job runs `verify.steps` optimizer steps in float64 on the CPU under several factorings of its
E (stepwise/contract/verdict.py chooses them; DDP on 2 gloo processes among them), from the same
weights and seed; after every step the window's loss and every parameter are compared with
(E, 1, 1)'s. Invariant: all within float64 rounding (exit 0). Not invariant (exit 1): the first
step and parameters (forward order) that diverge, and experiments that find why
(stepwise/run/diagnosis.py). A mistake in the arguments is one line (exit 2). The report is
printed and written to `<run dir>/verify.json`; an MLflow run only with `verify.log=true`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stepwise.contract.errors import ConfigError

log = logging.getLogger("stepwise")

DEFAULTS = {"steps": 3, "log": False}


def split_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`verify.<key>=<value>` arguments (checked, one line for a mistake) and the job's own."""
    settings, rest = dict(DEFAULTS), []
    for arg in argv:
        if not arg.startswith("verify."):
            rest.append(arg)
            continue
        key, _, value = arg[len("verify."):].partition("=")
        if key == "steps" and value.isdigit() and int(value) >= 1:
            settings["steps"] = int(value)
        elif key == "log" and value.lower() in ("true", "false"):
            settings["log"] = value.lower() == "true"
        elif key in DEFAULTS:
            raise ConfigError(f"verify.{key}", value, "must be a positive integer" if key == "steps"
                              else "must be true or false", f"e.g. verify.{key}="
                              f"{'3' if key == 'steps' else 'true'}")
        else:
            raise ConfigError(f"verify.{key}", value, "no such key",
                              "use verify.steps=<optimizer steps> or verify.log=true")
    return settings, rest


def verify_job(job: Any, run_dir: Path, settings: dict[str, Any]) -> int:
    """Run, compare, diagnose, report; the exit status (0 invariant, 1 not)."""
    from stepwise.contract.verdict import as_json, factorings, first_divergence, tolerance
    from stepwise.run.verification import differences, run_factoring, summary

    steps, effective = settings["steps"], job.plan.effective_batch_size
    chosen = factorings(effective)
    if len(chosen) < 2:
        raise ConfigError("effective_batch_size", effective, "has no other factoring to compare "
                          "with", "verify a job whose effective batch is 2 or more")
    log.info("verify: E=%d as %s; %d optimizer steps each, float64 on the CPU, seed %d",
             effective, ", ".join(map(str, chosen)), steps, job.config.seed)
    runs = {str(f): run_factoring(job.config, f, steps, run_dir) for f in chosen}
    reference = runs[str(chosen[0])]
    compared = {name: differences(reference, run) for name, run in list(runs.items())[1:]}
    divergence = first_divergence(compared)
    report = {"effective_batch_size": effective, "steps": steps, "seed": job.config.seed,
              "tolerance": {"per_step": tolerance(1), "relative_to": "1 + |reference value|"},
              "factorings": [str(f) for f in chosen], "reference": str(chosen[0]),
              "losses": {name: summary(run) for name, run in runs.items()},
              "differences": as_json(compared),
              "verdict": "invariant" if divergence is None else "not invariant",
              "first_divergence": None if divergence is None else vars(divergence),
              "diagnosis": [] if divergence is None else _diagnose(job, chosen, steps, run_dir,
                                                                   reference)}
    (run_dir / "verify.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    if settings["log"]:
        _log_to_mlflow(job, run_dir, report)
    return 0 if divergence is None else 1


def _diagnose(job: Any, chosen: list, steps: int, run_dir: Path, reference: dict
              ) -> list[dict[str, Any]]:
    """The rerun experiments (every factoring again, with one change), the sample probes, and,
    when none explains it, whether the training draws random numbers at all."""
    import torch

    from stepwise.contract.verdict import first_divergence
    from stepwise.data.loaders import fetch
    from stepwise.run.build import build_loss, build_model
    from stepwise.run.diagnosis import Reseeded, randomness, rerun_experiments, sample_probes
    from stepwise.run.verification import differences, run_factoring

    config = job.config

    def agree(change, other_config) -> bool:
        runs = [run_factoring(other_config or config, f, steps, run_dir, change) for f in chosen]
        return first_divergence({str(f): differences(runs[0], run)
                                 for f, run in zip(chosen[1:], runs[1:])}) is None

    torch.manual_seed(config.seed)
    model = build_model(config, job.data).double()
    findings = rerun_experiments(model, config, agree)
    findings += sample_probes(model, build_loss(config, job.data),
                              lambda indices: fetch(job.data, torch.float64, config.seed, indices))
    if not any(finding.explains for finding in findings):
        again = run_factoring(config, chosen[0], steps, run_dir, Reseeded(config.seed + 1))
        findings.append(randomness(first_divergence({"x": differences(reference, again)})))
    return [finding.as_dict() for finding in findings]


def table(report: dict[str, Any]) -> str:
    """The terminal report: a line per factoring and step, the verdict, the diagnosis."""
    lines = [f"verify: E={report['effective_batch_size']}, {report['steps']} optimizer steps in "
             f"float64 on the CPU, seed {report['seed']}; tolerance {report['tolerance']['per_step']:.2g}"
             f" x step, relative to 1 + |value|",
             f"{'factoring (b x k x W)':<24}{'step':>5}{'loss':>16}{'loss diff':>12}"
             f"{'max |param diff|':>18}  agrees"]
    for name, losses in report["losses"].items():
        for row in losses:
            diff = next((d for d in report["differences"].get(name, []) if d["step"] == row["step"]),
                        None)
            extra = ("" if diff is None else f"{diff['loss']:>12.2g}{diff['max_abs']:>18.2g}  "
                     f"{'yes' if diff['agrees'] else 'NO'}")
            reference = "  (reference)" if diff is None and row["step"] == 1 else ""
            lines.append(f"{name:<24}{row['step']:>5}{row['loss']:>16.10f}{extra}{reference}")
    first = report["first_divergence"]
    if first is None:
        lines.append("verdict: invariant: every factoring gives the reference's losses and "
                     "weights within float64 rounding")
        return "\n".join(lines)
    where = "; ".join(f"{p['name']} ({p['module']}) by {p['max_abs']:.3g}" for p in first["parameters"])
    lines.append(f"verdict: NOT invariant: from optimizer step {first['step']}, {first['factoring']} "
                 f"differs from {report['reference']}: {where or 'the loss'}")
    for finding in report["diagnosis"]:
        mark = "CAUSE" if finding["explains"] else "no"
        lines.append(f"  {finding['name']:<15} {mark:<6} {finding['tried']}: {finding['detail']}"
                     + (f"; fix: {finding['fix']}" if finding["fix"] else ""))
    if not any(f["explains"] for f in report["diagnosis"]):
        lines.append("  no experiment explains it: look for randomness or batch-level operations "
                     "in the model, the data or the loss")
    return "\n".join(lines)


def _log_to_mlflow(job: Any, run_dir: Path, report: dict[str, Any]) -> None:
    """`verify.log=true`: one MLflow run with the verdict as a tag and verify.json."""
    from stepwise.tracking.tracker import MlflowTracker, default_tracking_uri

    logger = job.config.logger
    tracker = MlflowTracker(default_tracking_uri(logger.tracking_uri, Path.cwd()),
                            logger.experiment_name, run_name=f"verify E={report['effective_batch_size']}",
                            tags={"stepwise.verify": report["verdict"]})
    tracker.log_params({"effective_batch_size": report["effective_batch_size"],
                        "verify.steps": report["steps"],
                        "verify.factorings": ", ".join(report["factorings"])})
    tracker.log_artifact(run_dir / "verify.json")
    tracker.close("FINISHED")
    log.info("verify: logged to MLflow run %s", tracker.run_id)
