"""The built-in data: in-memory arrays (digits, synthetic, linreg), torchvision images (fake,
imagefolder, mnist, cifar10), a user's map-style Datasets by `_target_` (datasets), the
`tinytext` corpus (TinyText, pad_collate), batches as (inputs, target), and the loaders.

Configs name them by their short path, `stepwise.data.<name>` (e.g. `_target_:
stepwise.data.digits`): attributes of this package, imported from their module on first use (PEP
562), so that importing `stepwise.data` imports no torch or torchvision (a dry run of vector data
imports numpy only).

Layer 4 of 9: may import `contract`, `config`, `parallel`.
"""

from __future__ import annotations

import importlib
from typing import Any

# short name -> the module (of this package) that defines it
_EXPORTS = {
    "digits": "arrays", "synthetic": "arrays", "linreg": "arrays",
    "fake": "images", "imagefolder": "images", "mnist": "images", "cifar10": "images",
    "datasets": "mapstyle",
    "TinyText": "text", "pad_collate": "text",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
