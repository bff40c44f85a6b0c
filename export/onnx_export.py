"""``--format onnx``: a KV-cache decoder for ONNX Runtime's CPU execution provider.

What lands in the bundle (next to manifest.json and the tokenizer, so the bundle
folder itself is what onnxruntime-genai opens: ``og.Model(bundle)``):

* ``model.onnx``: one graph for prefill and decode, I/O named as Optimum and
  onnxruntime-genai name them (see ``onnx_decoder``), opset 17 + ``com.microsoft`` 1,
  IR version 8, ``onnx.checker`` clean. Weights over ~1.8 GB in total go to
  ``model.onnx.data`` (external data, 4 KiB-aligned); smaller models are one file.
* ``genai_config.json`` for the MobileLLM family (Llama-shaped): onnxruntime-genai runs
  the folder directly, one KV slot per block application for -LS models; plus a
  ``tokenizer_config.json`` when the bundle has none (``og.Tokenizer`` requires one).
  PLM gets none: its cache is the compressed MLA latent (512 wide) plus the rope key
  (64 wide), while genai's config has one ``head_size`` for key and value caches of
  [batch, kv_heads, len, head_size]; phonekit's own loop (``onnx_runtime``) and the
  sample apps' plain onnxruntime loops run it.

How the graph is made: written node by node (``onnx_graph``) rather than traced with
``torch.onnx.export``. The dynamo exporter keeps a -LS block's weight once but
leaves un-folded ``Transpose`` nodes that ONNX Runtime's quantizer then skips without
a word; tracing a 1.8B model also needs several copies of the weights in memory.
Writing the graph gives exact I/O names, weights stored once, quantized nodes we
can count, and one tensor at a time on disk. Parity with the eager model is tested.

Quantization (``phonekit.quant`` plan; codes, scales and offsets from
``quant.reference.quantize_weight`` for the plan's weight method, see ``onnx_quant``):

* ``w4`` / ``8da4w``: ``MatMulNBits`` bits=4 with the scheme's group as block size,
  ``accuracy_level=1`` (float32 compute; "unset" took a ~4x slower kernel path).
  Symmetric methods (``sym``, ``sym-search``, ``hqq``): the default zero point, so the
  dequantized weights equal the reference's. Offset methods: ``asym``'s integer zeros as
  MatMulNBits' uint8 zero points (exact, same kernels and speed); the float offsets of
  ``affine`` / ``affine-search`` as a correction ``+ (per-group sums of x) @ C.T`` with
  C = -zero * scale beside a zero-point-free MatMulNBits, in fp32 (float rounding of the
  reference, one fp32 per group like a scale: +13 MB on SmolLM2-135M), or with
  ``--offsets int8`` one int8 per group in an 8-bit MatMulNBits (``onnx_quant.OFFSET_BLOCKS``,
  +4.2 MB). ONNX
  Runtime 1.32 also takes float zero points (int4 only), but its CPU kernel then skips
  prepacking and dequantizes the whole weight to fp32 on every call:
  ``DecoderOptions(float_offsets="zero_points")`` writes them, the CLI does not. Measured
  on SmolLM2-135M, w4 + ``--quant-embedding 4w``, 1 thread, x86 (loaded 2-core machine),
  decode tok/s: sym 66-70, affine-search with the correction 58-62, with float zero
  points 5.6.
* ``8da8w``: int8 weights [K, N] and ``MatMulInteger`` (below).
* ``w8``: ``MatMulNBits`` bits=8, the per-channel scale repeated per block: exact, but
  ONNX Runtime 1.32's CPU EP has no fast float-activation int8 kernel: on this x86
  machine a w8 demo decodes ~6x slower than fp32 (1.3 vs 8.3 tok/s). Prefer 8da8w or w4.
* ``--quant-embedding``: ``GatherBlockQuantized`` on packed data that a tied head reads
  with ``MatMulNBits`` (stored once); with 8da* + ``8w`` the head is a MatMulInteger on
  an int8 [D, V] matrix and the lookup gathers its columns (stored once). Float tied
  heads use ``Gemm(transB=1)`` on the embedding, so no transposed copy exists.
* ``fp16``: weights stored as float16 and cast to float32 in the graph (the CPU EP
  computes float32 and folds the casts when it loads the model): half the file, not
  half the memory.
* ``8da*`` activations. ONNX has no per-token dynamic quantize op; two candidates were
  measured against ``quant.reference``:

  - ``qdq`` (the default): ReduceMin/ReduceMax/Round/Clip nodes quantize each quantized
    linear's input per token, op for op ``fake_quant_per_token``. 8da8w then multiplies
    the uint8 codes by the int8 weights with ``MatMulInteger`` and subtracts
    (zp + 128) * colsum(W) in int32 (its CPU kernel takes no per-row zero point), so the
    sum is exact; 8da4w feeds the rounded values to ``MatMulNBits`` (float compute).
  - ``acc4``: ``MatMulNBits accuracy_level=4``, where the kernel itself quantizes each
    row *per weight block* to symmetric int8: a different quantization than the
    scheme names.

  Tiny models (tests/test_onnx.py): ``qdq`` is within 1e-6 of the reference, ``acc4``
  1e-3..1e-2 away. SmolLM2-135M (41 tokens): the 8da* reference is chaotic: the same
  torch model with its embedding scaled by 1 + 1e-6 noise moves the logits by 3.9-4.6%
  (relative L2) and flips 10-12% of the top-1 tokens, since one activation that rounds
  the other way moves by a whole int8 step. Against it ``qdq`` is 4.1-4.4% off (top-1
  90-93%), the noise floor, and ``acc4`` 4.3-6.8% (90-95%). Speed (x86, 2 shared cores,
  decode tok/s): 8da8w qdq 12.2 vs acc4 12.9; 8da4w qdq 12.2 vs acc4 16.3. ``qdq`` is
  the scheme's meaning and costs at most 25% decode speed here, so it is the default;
  ``DecoderOptions(act_method="acc4")`` keeps the other (not exposed on the CLI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phonekit.errors import ExportError, QuantError, UsageError
from phonekit.export.bundle import Artifact
from phonekit.export.onnx_decoder import DecoderInfo, DecoderOptions, build_decoder
from phonekit.export.onnx_graph import IR_VERSION, MS_OPSET, OPSET, Graph
from phonekit.export.onnx_quant import OFFSET_BLOCKS, OFFSET_CORRECTION, OFFSET_FLOAT, OFFSET_UINT8

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# protobuf cannot hold 2 GiB; past this many bytes of weights, write external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

PLM_GENAI_REASON = (
    "onnxruntime-genai describes the cache as key/value tensors [batch, kv_heads, len, head_size] with one "
    "head_size; PLM caches the compressed MLA latent (kv_lora_rank wide) and the rope key (qk_rope_head_dim wide), "
    "so run it with phonekit's onnxruntime loop (phonekit run --format onnx) or a plain onnxruntime session"
)


def check_inputs(lm: Any, plan: Any, context: int) -> None:
    """Refuse what cannot work before anything is written."""
    maxc = lm.config.max_context
    if context < 2 or context > maxc:
        raise UsageError(f"--context {context}: must be 2..{maxc} (the model's maximum); use --context {min(maxc, 2048)} or less")
    for name, lp in plan.linears.items():
        if lp.group_size is not None and lp.group_size < 16:
            raise QuantError(f"--quant {plan.scheme.name}: ONNX Runtime's MatMulNBits needs groups of 16 or more "
                             f"({name} has {lp.group_size}); use --quant {plan.scheme.base}-g32 for --format onnx")


def genai_config(lm: Any, context: int) -> dict[str, Any]:
    """onnxruntime-genai's config for the concat-cache graph (``past_present_share_buffer`` false)."""
    a = lm.config
    eos = list(a.eos_token_id)
    model: dict[str, Any] = {
        "bos_token_id": a.bos_token_id if a.bos_token_id is not None else eos[0],
        "context_length": context,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": eos[0],
        "type": "llama",
        "vocab_size": a.vocab_size,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE,
            "head_size": a.head_dim,
            "hidden_size": a.hidden_size,
            "num_attention_heads": a.num_attention_heads,
            # One KV slot per block application: a -LS model runs each stored block twice.
            "num_hidden_layers": a.block_applications,
            "num_key_value_heads": a.num_key_value_heads,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0,
    }
    return {"model": model, "search": search}


def genai_tokenizer_config(lm: Any, context: int) -> dict[str, Any] | None:
    """The ``tokenizer_config.json`` onnxruntime-genai's ``og.Tokenizer`` opens beside
    ``tokenizer.json`` / ``tokenizer.model`` (it fails without one); None without a tokenizer."""
    tok = lm.tokenizer
    if tok is None:
        return None
    cfg: dict[str, Any] = {
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": bool(tok.add_bos),
        "model_max_length": context, "clean_up_tokenization_spaces": False,
    }
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    if tok.kind == "sentencepiece":
        cfg["tokenizer_class"] = "LlamaTokenizer"
    return cfg


def _two_pass_text(plan: Any, info: DecoderInfo) -> str | None:
    if not info.two_pass_linears:
        return None
    kinds = ", ".join(sorted(plan.summary().get("two_pass_linears", {})))
    return (f"{info.two_pass_linears} linear calls ({kinds}): the int8 per-token input and its rounding residual, "
            + ("as extra rows of the same MatMulInteger, the two outputs summed" if info.two_pass_rows else
               "each rounded per token and summed before one MatMulNBits (float compute on the rounded input)"))


def _details(lm: Any, plan: Any, graph: Graph, info: DecoderInfo, external: bool, opts: DecoderOptions) -> dict[str, Any]:
    import onnxruntime as ort

    a = lm.config
    plm = a.family == "plm"
    if plan.scheme.dynamic_act:
        if opts.act_method == "qdq":
            act = {
                "method": "explicit per-token int8 in the graph",
                "detail": ("ReduceMin/ReduceMax/Round/Clip nodes quantize each quantized linear's input per token "
                           "(asymmetric min/max, as quant.reference.fake_quant_per_token); int8 weights then run as "
                           "MatMulInteger on the uint8 codes with a zero-point correction (integer accumulation), int4 "
                           "weights as MatMulNBits (float32 compute) on the dequantized int8 values"),
            }
        else:
            act = {
                "method": "MatMulNBits accuracy_level=4",
                "detail": ("ONNX Runtime quantizes each input row per weight block to symmetric int8 inside MatMulNBits "
                           "and runs int8 dot products; not the scheme's per-token asymmetric rounding"),
            }
        act["rounding_subgraphs"] = info.act_quant_nodes
    else:
        act = None
    emb = plan.embedding
    method = plan.scheme.weight_method
    storages = sorted({str(v.get("offsets")) for v in info.quantized.values() if v.get("offsets")})
    offsets = {
        OFFSET_UINT8: "MatMulNBits uint8 zero points (integer zeros, packed like the codes)",
        OFFSET_FLOAT: "MatMulNBits float32 zero points [N, blocks] (ORT dequantizes the weight per call)",
        OFFSET_CORRECTION: "zero-point-free MatMulNBits/MatMulInteger + (per-group sums of x) @ C.T, C = -zero * scale "
                      "(float32 [groups, N], initializer <name>.offset_t)",
        OFFSET_BLOCKS: "zero-point-free MatMulNBits + an 8-bit MatMulNBits (accuracy_level 4: the sums rounded to "
                       "int8 per token and block of 32 by the kernel) of (per-group sums of x) and C = -zero * scale, "
                       "int8 per row and block of 32 groups (initializers <name>.offset_q, uint8 [N, groups], padded "
                       "to whole blocks by a Pad / Reshape that ONNX Runtime folds when the session loads, and "
                       "<name>.offset_scales [N, blocks])",
    }
    head = ("Gemm(transB) on the float embedding (stored once)" if plan.head_tied_to_embedding and emb is None else
            "MatMulInteger on the embedding's int8 codes [D, V] (stored once), input rounded to int8 per token"
            + (" in two passes (the input and its rounding residual as extra rows of one MatMulInteger)"
               if plan.head_act_passes == 2 else "")
            if plan.head_tied_to_embedding and info.head_int8 else
            "MatMulNBits on the embedding's packed int weights (stored once)" if plan.head_tied_to_embedding else
            "MatMulNBits" if "lm_head" in plan.linears else "float MatMul")
    if plan.head_equalization:
        head += ("; the embedding is stored column-equalized (W * s: the lookup is multiplied by embed_scale = 1 / s "
                 "and 1 / s is folded into norm.weight)")
    return {
        "opset": {"ai.onnx": OPSET, "com.microsoft": MS_OPSET},
        "ir_version": IR_VERSION,
        "tested_with": f"onnxruntime {ort.__version__}",
        "execution_provider": "CPUExecutionProvider",
        "inputs": info.input_names,
        "outputs": info.output_names,
        "logits_to_keep": "optional int64 scalar input, default 0 = logits for every position; N > 0 = the last N only",
        "cache": info.cache,
        "onnxruntime_genai": {"compatible": False, "reason": PLM_GENAI_REASON} if plm else
        {"compatible": True, "config": GENAI_CONFIG, "model_type": "llama", "past_present_share_buffer": False},
        "activation_quantization": act,
        "weights": {
            "matmul_nbits_nodes": info.matmul_nbits_nodes,
            "matmul_integer_nodes": info.matmul_integer_nodes,
            "quantized_weights": len(info.quantized),
            "float_matmul_nodes": info.float_matmul_nodes,
            "float_storage": "float16" if plan.scheme.base == "fp16" else "float32",
            "method": method,
            "stored": None if method is None else (
                "codes + scales from quant.reference.quantize_weight; dequantized (u - zero_point) * scale"
                + ("" if not storages else "; offsets: " + "; ".join(offsets[s] for s in storages))),
            "zero_point_inputs": info.zero_point_inputs,
            "offset_corrections": info.offset_corrections,
            "merged_projections": info.merged,
            "two_pass_inputs": _two_pass_text(plan, info),
            "embedding": "Gather (float)" if emb is None else f"GatherBlockQuantized int{emb.bits} "
            + ("per row" if emb.group_size is None else f"g{emb.group_size}"),
            "head": head,
        },
        "initializers": {"count": len(graph.inits), "bytes": graph.weight_bytes, "external_data": external},
        "op_counts": graph.op_counts(),
    }


def export(lm: Any, plan: Any, context: int, root: Path, steps: Any, options: DecoderOptions | None = None) -> Artifact:
    """Write ``model.onnx`` (+ ``model.onnx.data``, ``genai_config.json``) into ``root``."""
    import onnx

    opts = options or DecoderOptions()
    check_inputs(lm, plan, context)
    with steps.step("onnx: build the decoder graph"):
        graph, info = build_decoder(lm.model, plan, context, opts)
    external = graph.weight_bytes > EXTERNAL_DATA_THRESHOLD
    root = Path(root)
    with steps.step(f"onnx: write {MODEL_FILE}" + (f" + {DATA_FILE}" if external else "")):
        try:
            graph.save(root / MODEL_FILE, DATA_FILE if external else None)
        except OSError as e:
            raise ExportError(f"{root / MODEL_FILE}: cannot write it ({e.strerror}); free disk space or choose another --out") from None
    with steps.step("onnx: onnx.checker"):
        try:
            onnx.checker.check_model(str(root / MODEL_FILE))
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0]
            raise ExportError(f"{MODEL_FILE}: onnx.checker rejects the graph ({first}); please report this bug") from None
    extra = [DATA_FILE] if external else []
    if lm.config.family != "plm":
        (root / GENAI_CONFIG).write_text(json.dumps(genai_config(lm, context), indent=2) + "\n", encoding="utf-8")
        extra.append(GENAI_CONFIG)
        tok_cfg = genai_tokenizer_config(lm, context)
        if tok_cfg is not None and not (root / TOKENIZER_CONFIG).exists():
            (root / TOKENIZER_CONFIG).write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
            extra.append(TOKENIZER_CONFIG)
    import onnxruntime as ort

    runtime = f"onnxruntime {ort.__version__}"
    if lm.config.family != "plm":
        try:
            import onnxruntime_genai as og

            runtime += f" / onnxruntime-genai {og.__version__}"
        except ImportError:
            runtime += " / onnxruntime-genai"
    return Artifact(
        format="onnx",
        file=MODEL_FILE,
        backend="onnxruntime-cpu",
        platforms=["android", "ios", "linux", "macos"],
        runtime=runtime,
        extra_files=extra,
        details=_details(lm, plan, graph, info, external, opts),
    )


__all__ = ["DATA_FILE", "EXTERNAL_DATA_THRESHOLD", "GENAI_CONFIG", "MODEL_FILE", "check_inputs", "export", "genai_config"]
