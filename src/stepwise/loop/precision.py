"""Numeric precision and the GPU fast path: autocast, the fp16 GradScaler, TF32, channels_last and
torch.compile, each chosen by a `trainer.*` key and applied in one place.

`trainer.precision`:
    32        float32 weights and compute (TF32 matmuls on Ampere+ GPUs unless `trainer.tf32=false`)
    64        float64 everywhere (exact comparisons in tests)
    bf16      float32 weights, forward under autocast to bfloat16; no scaler needed
    16-mixed  float32 weights, forward under autocast to float16, a GradScaler on the loss
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "16-mixed": torch.float16}


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights, the optimizer state and the data tensors."""
    return torch.float64 if precision == "64" else torch.float32


class Precision:
    """What the loop does differently per precision: the forward's autocast, and for 16-mixed
    the loss scaling, one unscale per optimizer step, and steps skipped on overflow.

    The scaler scales the loss of every micro-step by the same factor and unscales the
    accumulated gradient once, before clipping and the step: the accumulated gradient is the
    one of the unscaled loss, as in float32.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision, self.device_type = precision, device.type
        self.scaler = (torch.amp.GradScaler(device.type) if precision == "16-mixed" else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision not in AUTOCAST:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AUTOCAST[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the gradients those of the unscaled loss (before clipping or measuring them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step; False when the scaler skipped it (inf/NaN gradients in fp16)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale is cut exactly when a step is skipped

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def set_tf32(enabled: bool, device: torch.device) -> bool:
    """TF32 matmuls and convolutions on Ampere+ GPUs (float32 weights, 10-bit mantissa products).
    Returns whether TF32 is in use."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def inputs_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Images (N, C, H, W) in channels_last when asked; anything else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile` the wrapped model (a DDP model compiles with DDPOptimizer, which keeps
    one graph per gradient bucket so that the all-reduce still overlaps the backward)."""
    return torch.compile(model) if enabled else model
