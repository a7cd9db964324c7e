"""A trained model in MLflow's format: the bare module, on the CPU, in eval mode, logged as an MLflow
PyTorch model with its signature, so that `mlflow.pytorch.load_model(model_uri)` gives it back.

MLflow 3 saves PyTorch models as `torch.export` programs ("pt2") by default, and refuses to load
pickled ones unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set: stepwise logs pt2. torch.export
takes tensors only, so a model called as `model(**inputs)` (mapping batches) is logged behind
an adapter that takes the mapping's tensors positionally, in the signature's order. The batch
dimension is variable, and so is the second dimension of integer inputs (token ids: the sequence).

Each model is a LoggedModel of the run (MLflow 3's "Logged models"), with the metrics the run
logged at its step; `runs:/<run_id>/<name>` and `models:/<model_id>` both load it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch
from torch import nn

MODEL_NAME = "model"  # the final model
BEST_NAME = "best_model"  # with trainer.monitor: the weights of checkpoints/best.pt


class UnsupportedInputs(ValueError):
    """The model's inputs are not tensors (or a tuple or mapping of them): no MLflow model."""


class KeywordInputs(nn.Module):
    """`model(**inputs)` behind positional tensors, in `keys` order (torch.export takes no
    mappings). Made by `keyword_inputs`, whose subclass's forward names them: torch.export
    matches inputs to the forward's signature."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors: torch.Tensor):
        return self.model(**dict(zip(self.keys, tensors)))


def keyword_inputs(model: nn.Module, keys: tuple[str, ...]) -> KeywordInputs:
    """A KeywordInputs whose forward's signature lists `keys` (or input_<i> for a key that is
    not a Python name)."""

    def forward(self, *tensors: torch.Tensor):
        return KeywordInputs.forward(self, *tensors)

    param = inspect.Parameter
    forward.__signature__ = inspect.Signature(
        [param("self", param.POSITIONAL_ONLY),
         *(param(key if key.isidentifier() else f"input_{i}", param.POSITIONAL_ONLY)
           for i, key in enumerate(keys))])
    return type("KeywordInputs", (KeywordInputs,), {"forward": forward})(model, keys)


def positional(inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """(the inputs as positional tensors, their names: None for one tensor)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), None
    if isinstance(inputs, dict):
        keys, values = tuple(map(str, inputs)), tuple(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        keys, values = tuple(f"input_{i}" for i in range(len(inputs))), tuple(inputs)
    else:
        keys, values = (), (inputs,)
    odd = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
    if odd or not values:
        raise UnsupportedInputs(f"the model takes {type(inputs).__name__} inputs holding "
                                f"{', '.join(odd) or 'nothing'}, and MLflow's PyTorch format "
                                "(torch.export) takes tensors only")
    return values, keys


def _spec(array, name: str | None, length: int | None):
    """MLflow's TensorSpec of `array`: a variable batch, and a variable sequence in the
    dimensions after it whose size is the example's sequence `length` (None: no sequence)."""
    from mlflow.types import TensorSpec

    shape = [-1, *(-1 if size == length else size for size in array.shape[1:])]
    return TensorSpec(array.dtype, tuple(shape), name)


def signature(tensors: tuple[torch.Tensor, ...], names: tuple[str, ...] | None, output: Any):
    """The model's signature: its inputs (named when there are several) and its output. The
    second dimension of integer inputs (token ids) is their sequence: variable, in the inputs
    and in the outputs' dimensions of that size."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema

    sequences = [t for t in tensors if not t.is_floating_point() and t.dim() >= 2]
    length = sequences[0].shape[1] if sequences else None
    inputs = Schema([_spec(t.numpy(), None if names is None else name,
                           None if t.is_floating_point() else length)
                     for t, name in zip(tensors, names or (None,))])
    outputs = output if isinstance(output, dict) else {None: output}
    if not all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return ModelSignature(inputs)  # e.g. a tuple or a dataclass: no output schema
    return ModelSignature(inputs, Schema([
        _spec((v.float() if v.dtype == torch.bfloat16 else v).numpy(), k, length)
        for k, v in outputs.items()]))


def log_model(tracking_uri: str, run_id: str, module: nn.Module, example: Any, *,
              name: str = MODEL_NAME, step: int = 0, registered_model_name: str | None = None
              ) -> str:
    """Log `module` (bare, on the CPU, in eval mode) into run `run_id` as MLflow model `name`.

    Args:
        tracking_uri: the run's tracking store.
        module: the model; not changed.
        example: inputs the model takes (a tensor, a tuple or a mapping of tensors): they fix
            the signature and trace the exported program.
        step: the run's global_step this model is from (its metrics there are linked to it).
        registered_model_name: also register it as a new version of this model.

    Returns:
        The model's URI (`models:/<model_id>`). Raises UnsupportedInputs for inputs that are not
        tensors, and MLflow's or torch.export's error if the model cannot be logged.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from stepwise.data.batches import call_model, to_device

    example = to_device(example, torch.device("cpu"))
    tensors, names = positional(example)
    with torch.no_grad():
        output = call_model(module, example)
    exported = keyword_inputs(module, names) if isinstance(example, dict) else module
    # MLflow's model logging reads the global tracking URI, not the client's; set for this call
    # only (set_tracking_uri also sets MLFLOW_TRACKING_URI, which later jobs of a sweep in this
    # process would take for their own default store).
    with _global_tracking_uri(tracking_uri):
        client = MlflowClient(tracking_uri)
        run = client.get_run(run_id)
        model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                           params=dict(run.data.params), model_type="pytorch")
        info = mlflow.pytorch.log_model(
            exported, name=name, run_id=run_id, model_id=model.model_id, step=step,
            signature=signature(tensors, names, output), serialization_format="pt2",
            # the example as saved beside the model; pt2 traces the tensors themselves
            input_example=tensors[0].numpy() if names is None else tensors,
            # stated, so that MLflow does not load the model in a subprocess to infer them
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # pt2 needs no more
            registered_model_name=registered_model_name)
    return info.model_uri


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's global tracking URI (and $MLFLOW_TRACKING_URI) set to `uri`, then put back
    (None: not set, the variable removed)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
