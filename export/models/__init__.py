"""Model families: one file per architecture (``ModelArgs``, the module, ``sanitize``)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from phonekit.errors import CheckpointError, ConfigError
from phonekit.export.models import mobilellm, plm
from phonekit.export.models.common import num_params

FAMILIES: dict[str, ModuleType] = {mobilellm.FAMILY: mobilellm, plm.FAMILY: plm}
_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES.values() for mt in fam.HF_MODEL_TYPES}

ModelArgs = mobilellm.ModelArgs | plm.ModelArgs


def family_of(args: ModelArgs) -> ModuleType:
    return FAMILIES[args.family]


def args_from_hf_config(cfg: Any, source: str = "config.json") -> ModelArgs:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    mt = cfg.get("model_type")
    fam = _BY_MODEL_TYPE.get(mt)
    if fam is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise ConfigError(f"{source}: unknown model_type {mt!r}; phonekit loads {known}")
    try:
        return fam.ModelArgs.from_hf_config(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.json", source, 1)) from None


def build_model(args: ModelArgs) -> nn.Module:
    return family_of(args).Transformer(args)


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy sanitized weights into ``model`` after checking every shape."""
    own = model.state_dict()
    for name, t in weights.items():
        if name not in own:
            raise CheckpointError(f"{source}: tensor {name!r} has no place in the model")
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(t.shape)}, config.json implies {list(own[name].shape)}; "
                "the checkpoint does not match its config"
            )
    missing = set(own) - set(weights)
    tied_head = getattr(model.args, "tie_word_embeddings", True)
    if missing - ({"lm_head.weight"} if tied_head else set()):
        raise CheckpointError(f"{source}: no weights for {sorted(missing)[0]!r}")
    with torch.no_grad():
        model.load_state_dict(weights, strict=False, assign=False)


__all__ = ["FAMILIES", "ModelArgs", "args_from_hf_config", "build_model", "family_of", "load_weights", "num_params"]
