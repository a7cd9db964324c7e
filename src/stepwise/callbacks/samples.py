"""`callbacks=samples`: at each evaluation, the model's outputs on a few fixed validation samples,
logged as an MLflow artifact (`samples/step-<global_step>.json`), so that a run's predictions can
be read beside its curves."""

from __future__ import annotations

import json
from typing import Any

from stepwise.data.batches import call_model
from stepwise.loop.callbacks import Callback, RunView


def rows(indices: list[int], outputs: Any, target: Any) -> list[dict[str, Any]]:
    """One row per sample: its index, target and output; `predicted` (the argmax over the last
    axis) when the output has more dimensions than the target (class scores, token logits)."""
    found = []
    for position, index in enumerate(indices):
        out, tgt = outputs[position].double().cpu(), target[position].cpu()
        row = {"index": index, "target": tgt.tolist()}
        if out.dim() > tgt.dim():
            row["predicted"] = out.argmax(-1).tolist()
        row["output"] = [round(v, 6) for v in out.flatten().tolist()] if out.dim() else out.item()
        found.append(row)
    return found


class SampleLogger(Callback):
    """The first `num_samples` samples of `split`, through the model at each evaluation of it.

    Every rank runs the forward (under FSDP it is collective); rank 0 writes the file into
    `<run dir>/samples/` and logs it.

    Args:
        num_samples: how many samples, from the first of the split.
        split: `val` or `test`.
    """

    def __init__(self, num_samples: int = 8, split: str = "val") -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be >= 1")
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: must be 'val' or 'test'")
        self.num_samples, self.split = num_samples, split

    def on_evaluation_end(self, run: RunView, split: str, metrics: dict[str, float]) -> None:
        import torch

        if split != self.split:
            return None
        total = run.plan.val_samples if split == "val" else run.plan.test_samples
        indices = list(range(min(self.num_samples, total)))
        if not indices:
            return None
        inputs, target = run.batch(split, indices)
        model = run.model
        model.eval()
        try:
            with torch.no_grad():
                outputs = call_model(model, inputs)
        finally:
            model.train()
        if run.is_main and run.run_dir is not None:
            path = run.run_dir / "samples" / f"step-{run.global_step:08d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = ",\n  ".join(json.dumps(row) for row in rows(indices, outputs, target))
            path.write_text(f'{{"global_step": {run.global_step}, "split": "{split}", '
                            f'"rows": [\n  {lines}\n]}}\n')  # a sample per line
            run.log_artifact(path, "samples")
        return None
