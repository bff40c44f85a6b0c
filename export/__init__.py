"""Models, loaders, exporters and the CLI.

    from phonekit.export import load_model
    lm = load_model("smollm2-135m-instruct")
    lm.generate(lm.tokenizer.encode("Hello"), max_new_tokens=8)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phonekit.export.lm import LanguageModel
    from phonekit.export.loading import load_model
    from phonekit.export.presets import PRESETS

__all__ = ["LanguageModel", "PRESETS", "load_model"]
_HOME = {"LanguageModel": "phonekit.export.lm", "load_model": "phonekit.export.loading", "PRESETS": "phonekit.export.presets"}


def __getattr__(name: str) -> Any:
    # Lazy, so importing a CLI module does not load torch: optimum-cli imports the plugin on every start.
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
