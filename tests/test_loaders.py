"""Loaders: HF folders (safetensors / .bin, fp16 / bf16, sharded), GGUF files, hub ids
through a local huggingface_hub cache, tokenizers, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm, write_hf_checkpoint

from phonekit.errors import CheckpointError, ConfigError, HubError, PhonekitError, UsageError
from phonekit.export import load_model
from phonekit.export.cli import main


@pytest.mark.parametrize("family,ls", [("mobilellm", False), ("mobilellm", True), ("plm", False)])
@pytest.mark.parametrize("fmt,dtype", [("safetensors", torch.float16), ("bin", torch.bfloat16), ("safetensors", torch.float32)])
def test_hf_folder_roundtrip(tmp_path, family, ls, fmt, dtype):
    lm = make_tiny_lm(family, layer_sharing=ls)
    folder = write_hf_checkpoint(lm, tmp_path / "ckpt", fmt=fmt, dtype=dtype)
    loaded = load_model(str(folder))
    assert loaded.config.family == family and loaded.config.layer_sharing == ls
    ids = torch.randint(3, 300, (1, 12))
    # Weights were rounded to dtype on the way out: compare with the same rounding applied.
    expect = make_tiny_lm(family, layer_sharing=ls)
    with torch.no_grad():
        for p in expect.model.parameters():
            p.copy_(p.to(dtype).float())
    assert (loaded.logits(ids) - expect.logits(ids)).abs().max().item() < 1e-5
    assert loaded.tokenizer.encode("hi")[0] == 1 and loaded.tokenizer.decode(loaded.tokenizer.encode("hi")) == "hi"


def test_tokenizer_roundtrip_and_bos(tmp_path):
    lm = make_tiny_lm("mobilellm")
    folder = write_hf_checkpoint(lm, tmp_path / "ckpt")
    tok = load_model(str(folder)).tokenizer
    ids = tok.encode("Hello, phone!")
    assert ids[0] == 1 and len(ids) == 1 + len("Hello, phone!".encode())
    assert tok.decode(ids) == "Hello, phone!"


def test_sharded_safetensors_and_tied_extras(tmp_path):
    """A sharded index; an lm_head equal to the embedding and rotary inv_freq buffers are tolerated."""
    from safetensors.torch import save_file

    lm = make_tiny_lm("mobilellm")
    folder = write_hf_checkpoint(lm, tmp_path / "ckpt")
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wmap = {}
    for shard, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(folder / shard))
        wmap.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    loaded = load_model(str(folder))
    ids = torch.randint(3, 300, (1, 6))
    assert (loaded.logits(ids) - lm.logits(ids)).abs().max().item() < 1e-6


def test_sentencepiece_tokenizer_mobilellm_style(tmp_path):
    """MobileLLM ships a LLaMA-2 SentencePiece model with empty special strings: <unk>=0, <s>=1 prepended, </s>=2."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "phones run small language models",
                                 "memory is shared with the operating system"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=64,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    lm = make_tiny_lm("mobilellm")
    lm.tokenizer = None
    folder = write_hf_checkpoint(lm, tmp_path / "ckpt")
    shutil.copy(tmp_path / "sp.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "", "eos_token": "", "unk_token": ""}))
    tok = load_model(str(folder)).tokenizer
    ids = tok.encode("the lazy fox")
    assert tok.kind == "sentencepiece" and ids[0] == 1 and 2 not in ids
    assert tok.eos_ids == [2] and tok.decode(ids) == "the lazy fox"
    assert "tokenizer.model" in tok.files


def _gguf_write(path: Path, lm, arch: str) -> None:
    import gguf

    from phonekit.export.loaders.gguf_file import _LLAMA_TENSORS, _PLM_TENSORS

    a = lm.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(a.num_hidden_layers)
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_attention_heads)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_vocab_size(a.vocab_size)
    if arch == "llama":
        w.add_head_count_kv(a.num_key_value_heads)
        w.add_rope_dimension_count(a.head_dim)
    else:
        w.add_kv_lora_rank(a.kv_lora_rank)
        w.add_rope_dimension_count(a.qk_rope_head_dim)
        w.add_key_length(a.qk_nope_head_dim + a.qk_rope_head_dim)
        w.add_value_length(a.v_head_dim)
    # Tokenizer: a gpt2-style vocab with no merges is enough to carry ids.
    from tokenizers.pre_tokenizers import ByteLevel

    toks = ["<unk>", "<s>", "</s>"] + sorted(ByteLevel.alphabet())
    toks += [f"<pad{i}>" for i in range(a.vocab_size - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_types([3, 3, 3] + [1] * (len(toks) - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    inv = {v: k for k, v in (_LLAMA_TENSORS if arch == "llama" else _PLM_TENSORS).items()}
    for k, v in lm.model.state_dict().items():
        if k == "lm_head.weight" or k.startswith("caches."):
            continue
        arr = v.float().numpy().copy()
        if k == "embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "norm.weight":
            name = "output_norm.weight"
        else:
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            name = f"blk.{i}.{inv[mod]}.{leaf}"
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                # llama.cpp's converter permutes q/k rows for its RoPE layout.
                n_head = a.num_attention_heads if mod.endswith("q_proj") else a.num_key_value_heads
                arr = arr.reshape(n_head, 2, arr.shape[0] // n_head // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["mobilellm", "plm"])
def test_gguf_file(tmp_path, family):
    lm = make_tiny_lm(family)
    if family == "mobilellm":
        lm.config.model_type = "llama"
    path = tmp_path / f"tiny-{family}.gguf"
    _gguf_write(path, lm, "llama" if family == "mobilellm" else "plm")
    loaded = load_model(str(path))
    assert loaded.config.family == family and loaded.source == "gguf"
    ids = torch.randint(3, 300, (1, 10))
    assert (loaded.logits(ids) - lm.logits(ids)).abs().max().item() < 1e-5
    assert loaded.tokenizer.bos_id == 1 and 2 in loaded.config.eos_token_id


def test_hub_id_through_local_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout (models--owner--name/snapshots/REV)."""
    lm = make_tiny_lm("plm")
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-plm" / "snapshots" / ("a" * 40)
    write_hf_checkpoint(lm, snap)
    (cache / "models--tiny-org--tiny-plm" / "refs").mkdir(parents=True)
    (cache / "models--tiny-org--tiny-plm" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = load_model("tiny-org/tiny-plm")
    ids = torch.randint(3, 300, (1, 7))
    assert loaded.hub_id == "tiny-org/tiny-plm"
    assert (loaded.logits(ids) - lm.logits(ids)).abs().max().item() < 1e-6


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="local folder"):
        load_model("facebook/MobileLLM-125M-not-cached")
    rc = main(["generate", "facebook/MobileLLM-125M-not-cached", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "local folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _bad(tmp_path, mutate):
    lm = make_tiny_lm("mobilellm")
    folder = write_hf_checkpoint(lm, tmp_path / "ckpt")
    mutate(folder)
    return folder


@pytest.mark.parametrize("case,exc,needle", [
    ("missing_tensor", CheckpointError, "missing tensor 'model.layers.1.mlp.down_proj.weight'"),
    ("wrong_shape", CheckpointError, "has shape"),
    ("unknown_model_type", ConfigError, "unknown model_type 'gpt_neox'"),
    ("truncated", CheckpointError, "truncated"),
    ("non_json_config", ConfigError, "not valid JSON"),
    ("missing_config_field", ConfigError, "missing field 'hidden_size'"),
    ("no_weights", CheckpointError, "no model.safetensors"),
    ("unexpected_tensor", CheckpointError, "unexpected tensor"),
])
def test_bad_checkpoints(tmp_path, capsys, case, exc, needle):
    from safetensors.torch import load_file, save_file

    def mutate(folder: Path) -> None:
        st = folder / "model.safetensors"
        cfg = folder / "config.json"
        if case in ("missing_tensor", "wrong_shape", "unexpected_tensor"):
            sd = load_file(str(st))
            if case == "missing_tensor":
                del sd["model.layers.1.mlp.down_proj.weight"]
            elif case == "wrong_shape":
                sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
            else:
                sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(3, 3)
            save_file(sd, str(st))
        elif case == "unknown_model_type":
            c = json.loads(cfg.read_text())
            c["model_type"] = "gpt_neox"
            cfg.write_text(json.dumps(c))
        elif case == "truncated":
            data = st.read_bytes()
            st.write_bytes(data[: len(data) // 2])
        elif case == "non_json_config":
            cfg.write_text("{not json")
        elif case == "missing_config_field":
            c = json.loads(cfg.read_text())
            del c["hidden_size"]
            cfg.write_text(json.dumps(c))
        elif case == "no_weights":
            st.unlink()

    folder = _bad(tmp_path, mutate)
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_model(str(folder))
    rc = main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("phonekit generate: error:")


def test_truncated_gguf_and_wrong_suffix(tmp_path):
    lm = make_tiny_lm("mobilellm")
    lm.config.model_type = "llama"
    path = tmp_path / "t.gguf"
    _gguf_write(path, lm, "llama")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="t.gguf"):
        load_model(str(path))
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"must be a \.gguf"):
        load_model(str(other))
    with pytest.raises(UsageError, match="not a preset"):
        load_model("no-such-thing")


class NotATensor:
    """Any pickled object that is not a tensor."""


def test_bin_with_arbitrary_pickle_is_refused(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickled object is an error, not code execution."""
    lm = make_tiny_lm("mobilellm")
    folder = write_hf_checkpoint(lm, tmp_path / "ckpt", fmt="bin")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(PhonekitError, match="weights-only"):
        load_model(str(folder))
