"""Models built by config; the data passes `in_features` and `out_features` when they are built."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """Linear layers of `hidden_sizes` with an activation between them."""

    def __init__(self, in_features: int, out_features: int, hidden_sizes: list[int],
                 activation: str = "relu") -> None:
        sizes = [in_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-1], out_features))
        super().__init__(*layers)


class Linear(nn.Linear):
    """A single affine layer: logistic regression on classification data, linear regression else."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
