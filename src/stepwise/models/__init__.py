"""The built-in models and losses: MLP, Linear, CNN, torchvision's models, TinyLM, and the
per-item losses CrossEntropy and MSE (with their masks and per-sample means).

Configs name them by their short path, `stepwise.models.<Name>` (e.g. `_target_:
stepwise.models.MLP`): attributes of this package, imported from their module on first use (PEP
562), so that importing `stepwise.models` imports no torch.

Layer 5 of 9: may import `contract`, `config`, `parallel`, `data`.
"""

from __future__ import annotations

import importlib
from typing import Any

# short name -> the module (of this package) that defines it
_EXPORTS = {
    "MLP": "builtin", "Linear": "builtin", "CNN": "builtin", "torchvision_model": "builtin",
    "TinyLM": "lm",
    "CrossEntropy": "losses", "MSE": "losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
