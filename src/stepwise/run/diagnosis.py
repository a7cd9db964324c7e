"""Why runs that factor E differently disagree: experiments, not guesses.

Each rerun experiment changes one thing (BatchNorm on its running statistics, dropout off,
augmentation off) and runs every factoring again: the change that makes them all agree is the
cause. The probes put samples through the model (in eval mode, float64) alone and inside a
batch: an output or a per-sample loss that changes with its neighbours (padding, a batch-level
operation, in-batch coupling) is a dependence on how the batch is split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from stepwise.contract.verdict import tolerance


@dataclass
class Finding:
    """One experiment or probe: what it changed or tried, whether that explains the divergence."""

    name: str
    tried: str
    explains: bool
    detail: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def batchnorm_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def dropout_layers(model: nn.Module) -> list[str]:
    """Modules that drop at random in training: nn.Dropout and its kin, and modules with a
    `dropout` or `dropout_p` probability above 0 (attention's)."""
    found = []
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if "Dropout" in type(module).__name__ else None
        rate = rate if rate is not None else next(
            (getattr(module, a) for a in ("dropout", "dropout_p")
             if isinstance(getattr(module, a, None), float)), None)
        if rate:
            found.append(name)
    return found


class InEvalMode:
    """A model change: the named modules in eval mode (training never calls model.train()).
    A class, not a closure: spawned DDP ranks receive it pickled."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name in self.names:
            modules[name].eval()


REMEDIES = {
    "batchnorm": ("BatchNorm layers on their running statistics (eval mode)",
                  "BatchNorm normalises each micro-batch by its own statistics, so b changes "
                  "them (and W too, without sync)",
                  "GroupNorm or LayerNorm; parallel.sync_batchnorm=true makes W=2 x b equal to "
                  "2b, but accumulation still splits the statistics"),
    "dropout": ("dropout off", "dropout draws its masks per micro-batch from the global RNG, "
                "so another split draws others",
                "accept it (dropout is noise; compare with it off), or draw masks per sample "
                "from a seed of the sample"),
    "augmentation": ("augmentation off (data.train_transforms=[])",
                     "the random transforms are drawn per batch, not per sample",
                     "seed each sample's transform by its index and epoch"),
}


class Reseeded:
    """A change that leaves the model as built and draws the training's random numbers from
    another seed: the same factoring then trains differently only if it draws any."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, model: nn.Module) -> None:
        torch.manual_seed(self.seed)


def randomness(divergence: Any) -> Finding:
    """The finding of the reference factoring rerun `Reseeded` (`divergence`: against itself)."""
    draws = divergence is not None
    return Finding("randomness", "the reference factoring again, its random numbers from another "
                   "seed", draws, "it trains differently: the training draws random numbers "
                   "(dropout called as a function, noise, a random transform in your dataset), "
                   "and another split draws them in another order" if draws else
                   "it trains the same: the training draws no random numbers",
                   "draw them per sample, from a seed of the sample's index and epoch" if draws
                   else "")


def rerun_experiments(model: nn.Module, config: Any,
                      agree: Callable[[Callable | None, Any], bool]) -> list[Finding]:
    """The rerun experiments that apply to this model and data. `agree(change, config)` runs the
    factorings again with a model change or another config and says whether they all agree."""
    findings = []
    norms = batchnorm_layers(model)
    if norms:
        tried, why, fix = REMEDIES["batchnorm"]
        explains = agree(InEvalMode(norms), None)
        findings.append(Finding("batchnorm", tried, explains,
                                f"first BatchNorm layer in the model: {norms[0]} "
                                f"({type(dict(model.named_modules())[norms[0]]).__name__})"
                                + (f"; {why}" if explains else ""), fix if explains else ""))
    drops = dropout_layers(model)
    if drops:
        tried, why, fix = REMEDIES["dropout"]
        explains = agree(InEvalMode(drops), None)
        findings.append(Finding("dropout", tried, explains, f"dropout in {', '.join(drops[:3])}"
                                + (f"; {why}" if explains else ""), fix if explains else ""))
    if getattr(config.data, "train_transforms", None):
        tried, why, fix = REMEDIES["augmentation"]
        plain = copy.deepcopy(config)
        plain.data.train_transforms = []
        explains = agree(None, plain)
        findings.append(Finding("augmentation", tried, explains, why if explains else "",
                                fix if explains else ""))
    return findings


def _first(output: Any) -> torch.Tensor:
    """The first sample's output (a tuple's or dict's first tensor)."""
    if isinstance(output, dict):
        output = next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output[0]


def _overlap(alone: torch.Tensor, together: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of `together` (padded) that covers `alone`'s positions."""
    index = tuple(slice(0, n) for n in alone.shape)
    return alone, together[index]


def sample_probes(model: nn.Module, loss: Callable, batch: Callable[[list[int]], tuple]
                  ) -> list[Finding]:
    """The shortest of the first 32 samples alone, then beside the longest (padded to it when
    the data pads): its output (model in eval mode) and its per-item loss must not change."""
    from stepwise.data.batches import call_model

    model = model.eval()
    shapes = {i: _shape(batch([i])[0]) for i in range(32)}
    first = min(shapes, key=lambda i: shapes[i])  # the shortest sample, beside the longest
    other = max((i for i in shapes if i != first), key=lambda i: shapes[i])
    padded = shapes[other][1:] != shapes[first][1:]
    alone_inputs, alone_target = batch([first])
    inputs, target = batch([first, other])
    with torch.no_grad():
        alone_out, together_out = call_model(model, alone_inputs), call_model(model, inputs)
        output_diff = _relative(*_overlap(_first(alone_out), _first(together_out)))
        loss_diff = _relative(*_overlap(loss(alone_out, alone_target)[0],
                                        loss(together_out, target)[0]))
    limit = tolerance(1)
    explains = output_diff > limit
    if padded:
        name, fix = "padding", ("mask the padding in the model (average over the real tokens "
                                "only, e.g. with the batch's mask or lengths)")
        tried = (f"sample {first} alone (shape {shapes[first][1:]}) and padded to "
                 f"{_shape(inputs)[1:]} beside sample {other}")
    else:
        name, fix = "batch coupling", "make the model's output of a sample depend on that sample only"
        tried = f"sample {first} alone and beside sample {other} (eval mode)"
    changed = f"its output changed by {output_diff:.3g} (relative)" + (
        " with the padding around it" if padded else "")
    findings = [Finding(name, tried, explains, changed if explains else "its output is the same",
                        fix if explains else "")]
    if loss_diff > limit and not explains:
        findings.append(Finding("loss coupling", f"sample {first}'s loss alone and in a batch", True,
                                f"its loss changed by {loss_diff:.3g} (relative)",
                                "a loss of each sample on its own (no in-batch negatives or "
                                "batch-level normalisation), averaged by stepwise"))
    return findings


def _shape(inputs: Any) -> tuple[int, ...]:
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return tuple(inputs.shape)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs() / (1 + a.abs())).max().item() if a.numel() else 0.0
