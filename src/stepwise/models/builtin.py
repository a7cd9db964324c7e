"""Models built by config. The data passes `input_shape` (one sample's shape: (features,) or
(channels, height, width)) and `num_outputs` when they are built: no sizes are copied into configs.
"""

from __future__ import annotations

import math

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """Linear layers of `hidden_sizes` with an activation between them; images are flattened."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden_sizes: list[int],
                 activation: str = "relu") -> None:
        sizes = [math.prod(input_shape), *hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-1], num_outputs))
        super().__init__(*layers)

    def forward(self, x):
        return super().forward(x.flatten(1))


class Linear(nn.Linear):
    """A single affine layer: logistic regression on classification data, linear regression else."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        super().__init__(math.prod(input_shape), num_outputs)

    def forward(self, x):
        return super().forward(x.flatten(1))


class CNN(nn.Sequential):
    """A small convolutional classifier: (conv 3x3, BN, ReLU, max-pool 2) per width, then global
    average pooling and a linear head. Takes any image of at least 2^len(widths) pixels a side."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int,
                 widths: list[int] = (32, 64)) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs (channels, height, width) inputs, got {input_shape}")
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs)]
        super().__init__(*layers)


def torchvision_model(input_shape: tuple[int, ...], num_outputs: int, name: str,
                      weights: str | None = None, num_classes: int | None = None,
                      in_channels: int | None = None) -> nn.Module:
    """Any classification builder of `torchvision.models` (`resnet18`, `mobilenet_v3_small`, ...)
    with `num_outputs` classes; a first convolution made for other than 3 input channels.

    `num_classes` and `in_channels` follow the data; when set, `probe.check_model` has checked that
    they agree with it.
    """
    from stepwise.config.vision_import import torchvision

    model = torchvision().models.get_model(name, weights=weights, num_classes=num_outputs)
    channels = input_shape[0]
    if channels != 3:
        _set_input_channels(model, channels)
    return model


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Replace the first Conv2d by one with `channels` inputs (same kernel, stride, padding)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None, child.padding_mode))
                return
    raise ValueError(f"{type(model).__name__} has no Conv2d whose input channels could be set")
