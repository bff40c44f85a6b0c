"""Models, loaders, exporters and the CLI.

    from phonekit.export import load_model
    lm = load_model("smollm2-135m-instruct")
    lm.generate(lm.tokenizer.encode("Hello"), max_new_tokens=8)
"""

from phonekit.export.lm import LanguageModel
from phonekit.export.loading import load_model
from phonekit.export.presets import PRESETS

__all__ = ["LanguageModel", "PRESETS", "load_model"]
