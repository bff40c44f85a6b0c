"""Shared fixtures: tiny random models of both families (with a tiny byte-level
tokenizer), checkpoint writers in the exact HF layout, and the real demo model
loaded once per test process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from phonekit.export.lm import LanguageModel
from phonekit.export.loading import init_random
from phonekit.export.models import build_model, mobilellm, plm
from phonekit.export.tokenizer import Tokenizer

# Two xdist workers share two cores: one thread each avoids oversubscription (measured: 32 demo
# tokens took 65 s with 2 threads per worker under load and 4.5 s with 1).
torch.set_num_threads(1)

# `make test` runs two xdist workers with --dist loadgroup, so the tests that share a costly
# session fixture stay in one worker and export it once. The 8da4w demo .pte (the slowest
# export: 13 min alone on this machine, ExecuTorch's lowering ~21 s per layer) has its own
# group, so that it runs beside, not after, the other demo exports (fp32 .pte, ONNX, Core ML)
# in the "demo" group.
DEMO_PTE_GROUP = "demo-pte"
_FIRST = {DEMO_PTE_GROUP: 0, "demo": 1}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The two demo groups first (make test passes --no-loadscope-reorder, so xdist hands out
    work in this order): the workers start on them at once and the short tests fill in."""
    def rank(item: pytest.Item) -> int:
        mark = item.get_closest_marker("xdist_group")
        return _FIRST.get(mark.args[0], 2) if mark is not None and mark.args else 2

    items.sort(key=rank)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """On an xdist worker with --dist loadgroup, a grouped test must carry its group in its node
    id (that is how xdist groups). pytest 9.2 renamed the attribute pytest-xdist 3.8 writes, which
    made loadgroup a silent no-op: the demo .pte was exported once per worker and the suite
    took twice as long. Fail such a test instead."""
    if (getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") is not None
            and "@" not in item.nodeid):
        pytest.fail(f"pytest-xdist did not group {item.nodeid} (--dist loadgroup is a no-op with this "
                    "pytest/pytest-xdist pair): install the versions pinned in pyproject.toml", pytrace=False)


TINY_VOCAB = 320


def tiny_args(family: str, layer_sharing: bool = False, **kw):
    if family == "plm":
        base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                    rms_norm_eps=1e-6, rope_theta=100000.0, max_position_embeddings=128, bos_token_id=None,
                    eos_token_id=[2])
        base.update(kw)
        return plm.ModelArgs(**base)
    base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=128, layer_sharing=layer_sharing, tie_word_embeddings=True,
                bos_token_id=1, eos_token_id=[2], model_type="mobilellm")
    base.update(kw)
    return mobilellm.ModelArgs(**base)


def tiny_tokenizer_json() -> str:
    """A byte-level BPE with no merges: ids 0..2 specials, then the 256 bytes."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok.to_str()


def tiny_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    s = tiny_tokenizer_json()
    return Tokenizer(HFTokenizer.from_str(s), "hf", 1, [2], True, None, "<s>", "</s>", {"tokenizer.json": s.encode()})


def q41_grid(rows: int = 48, groups: int = 6, seed: int = 0) -> torch.Tensor:
    """Weights exactly on a GGUF Q4_1 grid: each group of 32 is d * q + m with q in 0..15, and
    every group spans the full code range, as a Q4_1 quantizer leaves it."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(rows, groups, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (torch.rand(rows, groups, 1, generator=g) * 0.06 - 0.05).half().float()
    q = torch.randint(0, 16, (rows, groups, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(rows, groups * 32)


def make_tiny_lm(family: str = "mobilellm", layer_sharing: bool = False, seed: int = 0, std: float = 0.08, **kw) -> LanguageModel:
    args = tiny_args(family, layer_sharing, **kw)
    torch.manual_seed(seed)
    model = build_model(args)
    init_random(model, std=std)
    with torch.no_grad():  # non-trivial norms, so norm weights are exercised too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    name = f"tiny-{family}{'-ls' if layer_sharing else ''}"
    return LanguageModel(model.eval(), args, tiny_tokenizer(), name, "random", "apache-2.0")


def write_hf_checkpoint(lm: LanguageModel, folder: Path, fmt: str = "safetensors", dtype: torch.dtype = torch.float32,
                        extra: dict | None = None, drop: list[str] | None = None) -> Path:
    """Write ``lm`` in the exact Hugging Face layout: config.json, weights, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(lm.config.to_hf_config(), indent=2))
    sd = {}
    for k, v in lm.model.state_dict().items():
        if k == "lm_head.weight" and lm.config.tie_word_embeddings:
            continue
        if k.startswith("caches."):
            continue
        name = k if k == "lm_head.weight" else f"model.{k}"
        sd[name] = v.detach().to(dtype).contiguous().clone()
    sd.update(extra or {})
    for k in drop or []:
        sd.pop(k, None)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    if lm.tokenizer is not None:
        for name, data in lm.tokenizer.files.items():
            (folder / name).write_bytes(data)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": lm.tokenizer.bos_token, "eos_token": lm.tokenizer.eos_token, "add_bos_token": lm.tokenizer.add_bos}))
    return folder


@pytest.fixture(scope="session")
def demo_lm() -> LanguageModel:
    from phonekit.export import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture
def tiny_mobilellm() -> LanguageModel:
    return make_tiny_lm("mobilellm")


@pytest.fixture
def tiny_mobilellm_ls() -> LanguageModel:
    return make_tiny_lm("mobilellm", layer_sharing=True)


@pytest.fixture
def tiny_plm() -> LanguageModel:
    return make_tiny_lm("plm")


DEMO_CONTEXT = 256


def _export_demo(tmp_path_factory, fmt: str, quant: str) -> Path:
    from phonekit.export.cli import main

    out = tmp_path_factory.mktemp(f"demo-{fmt}") / "bundle"
    rc = main(["export", "smollm2-135m-instruct", "--format", fmt, "--quant", quant,
               "--context", str(DEMO_CONTEXT), "--out", str(out), "--quiet"])
    assert rc == 0, f"demo {fmt} export failed"
    return out


@pytest.fixture(scope="session")
def demo_pte_bundle(tmp_path_factory) -> Path:
    """The demo model exported once per test session: .pte, 8da4w, context 256."""
    return _export_demo(tmp_path_factory, "pte", "8da4w")


@pytest.fixture(scope="session")
def demo_pte_fp32_bundle(tmp_path_factory) -> Path:
    """The demo model as an fp32 .pte (context 256), for token-exact runner checks."""
    return _export_demo(tmp_path_factory, "pte", "fp32")


def plan_from_manifest(model, manifest: dict, fmt: str):
    """The QuantPlan an artifact was exported with, rebuilt from its manifest."""
    from phonekit.quant import make_plan, parse_embedding
    from phonekit.quant.schemes import scheme_from_manifest

    q = manifest["quantization"]
    emb = q.get("embedding") or {}
    bits = emb.get("bits")
    return make_plan(model, scheme_from_manifest(q), parse_embedding(f"{bits}w" if bits else "none"), fmt)
