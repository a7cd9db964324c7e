"""A trained model in MLflow's format: the bare module, on the CPU, in eval mode, logged as an MLflow
PyTorch model with its signature, so that `mlflow.pytorch.load_model(model_uri)` gives it back.

MLflow 3 saves PyTorch models as `torch.export` programs ("pt2") by default: stepwise logs pt2,
which loads without the model's code. torch.export takes tensors only, so a model called as
`model(**inputs)` (mapping batches) is logged behind an adapter that takes the mapping's tensors
positionally, in the signature's order. The batch dimension is variable, and so is the second
dimension of integer inputs (token ids: the sequence).

A model torch.export cannot trace (recurrent models over packed sequences, Python control flow on
tensor values) or whose inputs are not tensors is logged as MLflow's other form, the pickled
module itself (called as in training): it loads where its classes' packages are importable, and
MLflow refuses to unpickle it only under MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (it defaults
to true). Export is attempted once: its failure is the reason the form is pickled.

Each model is a LoggedModel of the run (MLflow 3's "Logged models"), with the metrics the run
logged at its step; `runs:/<run_id>/<name>` and `models:/<model_id>` both load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import tempfile
import traceback
from typing import Any

import torch
from torch import nn

MODEL_NAME = "model"  # the final model
BEST_NAME = "best_model"  # with trainer.monitor: the weights of checkpoints/best.pt
PT2, PICKLE = "pt2", "pickle"  # the model's forms, as MLflow's serialization_format names them


class UnsupportedInputs(ValueError):
    """The model's inputs are not tensors (or a tuple or mapping of them): no pt2, no signature."""


@dataclasses.dataclass(frozen=True)
class Logged:
    """A model as logged: its URI and form; for a pickled module, why it is not a torch.export
    program and the packages of its classes, which the pickle names by reference."""

    uri: str
    form: str = PT2
    why: str = ""
    packages: tuple[str, ...] = ()

    def describe(self) -> str:
        """The end of the line that reports it: `: <uri>` for pt2; for a pickled module also
        its form, why, and what `mlflow.pytorch.load_model` needs to load it."""
        if self.form == PT2:
            return f": {self.uri}"
        needs = " and ".join(filter(None, [
            f"{', '.join(self.packages)} importable" if self.packages else "",
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION unset or true"]))
        return (f" as a pickled module ({self.why}): {self.uri}; mlflow.pytorch.load_model needs "
                f"{needs}")


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
              ) -> Logged:
    """Log `module` (bare, on the CPU, in eval mode) into run `run_id` as MLflow model `name`:
    a torch.export program, else (export failed, or the inputs are not tensors) the pickled module.

    Args:
        tracking_uri: the run's tracking store.
        module: the model; not changed.
        example: inputs the model takes (a tensor, a tuple or a mapping of tensors): they fix
            the signature and trace the exported program.
        step: the run's global_step this model is from (its metrics there are linked to it).
        registered_model_name: also register it as a new version of this model.

    Returns:
        The model as logged: its URI (`models:/<model_id>`) and form. Raises MLflow's error, or
        pickle's, if the model cannot be logged in either form.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from stepwise.data.batches import call_model, to_device

    example = to_device(example, torch.device("cpu"))
    with torch.no_grad():
        output = call_model(module, example)
    try:
        tensors, names = positional(example)
    except UnsupportedInputs as err:
        tensors, names, why = (), None, str(err)
    # MLflow's model logging reads the global tracking URI, not the client's; set for this call
    # only (set_tracking_uri also sets MLFLOW_TRACKING_URI, which later jobs of a sweep in this
    # process would take for their own default store).
    with _global_tracking_uri(tracking_uri):
        client = MlflowClient(tracking_uri)
        run = client.get_run(run_id)
        model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                           params=dict(run.data.params), model_type="pytorch")
        options = dict(name=name, run_id=run_id, model_id=model.model_id, step=step,
                       # stated, so that MLflow does not load the model in a subprocess to infer them
                       pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                       registered_model_name=registered_model_name)
        if not tensors:  # MLflow's whole logging path, pickled, without a signature
            with _pickle_warning_left_out():
                mlflow.pytorch.log_model(module, serialization_format=PICKLE, **options)
            return Logged(model.model_uri, PICKLE, why, _packages(module))
        # the example as saved beside the model; pt2 traces the tensors themselves
        options.update(signature=signature(tensors, names, output),
                       input_example=tensors[0].numpy() if names is None else tensors)
        try:
            exported = keyword_inputs(module, names) if isinstance(example, dict) else module
            return Logged(mlflow.pytorch.log_model(exported, serialization_format=PT2,
                                                   **options).model_uri)
        except Exception as err:
            if not _raised_by_export(err):
                raise
            why = f"torch.export cannot trace it: {_first_line(err)}"
        _log_pickled(client, model, module, why, options)
    return Logged(model.model_uri, PICKLE, why, _packages(module))


def _raised_by_export(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) came out of torch.export.export."""
    while err is not None:
        if any(frame.f_globals.get("__name__") == "torch.export" and frame.f_code.co_name ==
               "export" for frame, _ in traceback.walk_tb(err.__traceback__)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException, width: int = 100) -> str:
    """`Type: the message's first line`, cut to `width` characters."""
    line = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return line if len(line) <= width else line[:width - 3] + "..."


def _packages(module: nn.Module) -> tuple[str, ...]:
    """The top-level packages of the module's classes, which a pickle names by reference
    (torch aside; MLflow's cloudpickle saves the classes of `__main__` by value)."""
    return tuple(sorted({type(m).__module__.split(".")[0] for m in module.modules()}
                        - {"torch", "__main__"}))


def _log_pickled(client, model, module: nn.Module, why: str, options: dict[str, Any]) -> None:
    """Save `module` pickled into LoggedModel `model`, then mark it READY (and register it).

    Its pt2 logging failed in torch.export after MLflow had linked it to the run and to the
    metrics at its step, and marked it FAILED: the same LoggedModel takes the pickled module,
    so that the run has one model of that name, linked once.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp, _pickle_warning_left_out():
        path = os.path.join(tmp, "model")
        card = Model(artifact_path=model.artifact_location, run_id=options["run_id"],
                     model_uuid=model.model_id, model_id=model.model_id)
        try:
            mlflow.pytorch.save_model(module, path, mlflow_model=card,
                                      serialization_format=PICKLE, signature=options["signature"],
                                      input_example=options["input_example"],
                                      pip_requirements=options["pip_requirements"])
        except Exception as err:
            raise RuntimeError(f"{why}; and pickling it failed: {_first_line(err)}") from err
        client.log_model_artifacts(model.model_id, path)
    client.finalize_logged_model(model.model_id, "READY")
    if options["registered_model_name"]:
        mlflow.register_model(model.model_uri, options["registered_model_name"])


@contextlib.contextmanager
def _pickle_warning_left_out():
    """MLflow's warning on saving a pickled model (which recommends pt2) left out: the line that
    reports the model says its form and why."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")

    logger = logging.getLogger("mlflow.pytorch")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
