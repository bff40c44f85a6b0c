"""A Hugging Face folder: ``config.json`` + ``model.safetensors`` (or a sharded
index) or ``pytorch_model.bin`` (read with ``weights_only=True``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phonekit.errors import CheckpointError, ConfigError
from phonekit.export.models import ModelArgs, args_from_hf_config


def read_config(folder: Path) -> ModelArgs:
    path = folder / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: not found; a Hugging Face folder needs config.json next to its weights")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e.__class__.__name__}: {e}); fix or re-download the file") from None
    return args_from_hf_config(cfg, source=str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch.load raises many types for corrupt or unsafe pickles
        raise CheckpointError(
            f"{path}: cannot read it as a weights-only PyTorch checkpoint ({e.__class__.__name__}); "
            "it is truncated, corrupt or contains arbitrary pickled objects, which phonekit never loads"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the checkpoint, and a name for error messages."""
    st = folder / "model.safetensors"
    st_index = folder / "model.safetensors.index.json"
    pt = folder / "pytorch_model.bin"
    pt_index = folder / "pytorch_model.bin.index.json"
    if st.exists():
        return _read_safetensors(st), str(st)
    for index, reader in ((st_index, _read_safetensors), (pt_index, _read_bin)):
        if index.exists():
            try:
                wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e}); re-download it") from None
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(wmap.values())):
                if not (folder / shard).exists():
                    raise CheckpointError(f"{folder / shard}: shard named in {index.name} is missing; re-download it")
                out.update(reader(folder / shard))
            return out, str(index)
    if pt.exists():
        return _read_bin(pt), str(pt)
    raise CheckpointError(
        f"{folder}: no model.safetensors, sharded index or pytorch_model.bin; pass a folder with weights, a .gguf file, "
        "or a preset with --random-weights"
    )
