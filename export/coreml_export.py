"""Core ML export: a stateful ML Program (``model.mlpackage``, iOS 18 / macOS 15 minimum).

Design decisions (each checked with coremltools 9.0 + torch 2.13.0 on Linux):

* **One function with ranged input lengths, not a prefill/decode multifunction model.**
  ``inputIds`` is ``[1, RangeDim(1..context)]`` and ``causalMask`` ``[1, 1, RangeDim,
  RangeDim(1..context)]``; prefill and decode are the same function. Reasons: swift-transformers'
  ``LanguageModelWithStatefulKVCache`` refuses a model without a ranged query length; the
  Core ML LLM examples Apple and Hugging Face publish (Llama 3.1 on Core ML, Mistral 7B) use
  ranged shapes on the GPU; a range-flexible model runs on the Neural Engine only at its
  default shape (Apple engineer, developer forums thread 724930), and stateful models on the
  Neural Engine have open correctness/crash reports (apple/coremltools#2553, #2716), so the
  ANE-only gain of a static multifunction model does not pay for breaking swift-transformers.
  The recommended compute units are CPU+GPU (recorded in ``details``).
* **States**: two fp16 state tensors per model, one slot per block application (see
  ``coreml_model``); Core ML states cannot be flexible (apple/coremltools#2537), so they are
  sized to the bundle's context.
* **Conversion path**: ``torch.jit.trace`` (default; the Apple/HF pattern: one
  ``read_state -> slice_update -> write_state`` per layer and attention over ``0..past+q``).
  ``method="export"`` (``torch.export`` + ``run_decompositions``) is kept and tested as the
  second path: it chains the cache updates and writes each state once at the end, attends
  over the whole cache, and a torch.export guard limits one call to ``context - 1`` tokens.
  Both go through two converter overrides in ``coreml_tools`` (a NumPy-2 crash of the
  TorchScript frontend, and ``torch.where`` with a dynamic shape declaring a scalar type).
* **Precision**: fp16 compute (``ct.precision.FLOAT16``) except where fp16 breaks: the
  squares of every RMSNorm (``x**2`` passes 65504 once ``|x| > 256``) with their mean/eps/rsqrt,
  PLM's squared ReLU with the ``down_proj`` that consumes it, and the RoPE angles
  (``pos * inv_freq`` needs more than fp16's 11 bits); those run in fp32
  (``FP16ComputePrecision(op_selector=keep_fp32)``). ``--quant fp32`` converts at fp32 throughout
  (the states stay fp16: Core ML has no other state type). Measured on the demo
  (SmolLM2-135M, whose residual stream reaches |x| = 22552, x**2 = 5.1e8): with these
  exceptions teacher-forced top-1 agreement with eager is 128/128 (max logit error 0.09 of
  31); with every op in fp16 it is 3/128.
* **Weights**: ``w8``/``w4`` (any weight rounding method, ``w4:affine`` etc.) via
  ``coreml_quant``: ``constexpr_blockwise_shift_scale`` holding the reference's codes and
  scales, plus the float per-group offsets (``scale * (data - offset)``) of the offset methods
  (asym, affine, affine-search); PLM's ``kv_b_proj`` stays float like in every format.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phonekit.errors import ExportError, PhonekitError, QuantError, UsageError
from phonekit.export.bundle import Artifact
from phonekit.export.coreml_model import CoreMLDecoder, state_layout
from phonekit.quant.equalize import apply_head_equalization
from phonekit.quant.plan import QuantPlan

PACKAGE = "model.mlpackage"
METHODS = ("trace", "export")
# Metadata keys in the model's user-defined metadata (``MLModel.user_defined_metadata``).
META_PREFIX = "com.phonekit."
HF_NAME_KEY = "co.huggingface.exporters.name"  # what swift-transformers reads as the model name


def check_inputs(lm: Any, plan: QuantPlan, context: int) -> None:
    from phonekit.quant.schemes import check_format

    check_format(plan.scheme, "coreml")
    if plan.head_dynamic_act or any(lp.dynamic_act for lp in plan.linears.values()):
        raise QuantError("--format coreml: the plan quantizes activations per token, which Core ML cannot run; use --quant w4 or w8")
    maxc = lm.config.max_context
    if context < 3:
        # swift-transformers needs a ranged length (max - min > 1), so 1..2 is not enough.
        raise UsageError(f"--context {context}: Core ML export needs at least 3")
    if context > maxc:
        raise UsageError(f"--context {context}: over the model's maximum of {maxc}; use --context {maxc} or less")
    state_layout(lm.config, context)


_SHAPE_OPS = ("expand_dims", "squeeze", "reshape", "transpose")
_REDUCE_OPS = ("reduce_mean", "reduce_sum")
_TRIG_OPS = ("sin", "cos")


def _producer(op: Any, param: str) -> Any:
    v = getattr(op, param, None)
    return None if v is None or not hasattr(v, "op") else v.op


def _through_shape_ops(op: Any) -> Any:
    while op is not None and op.op_type in _SHAPE_OPS:
        op = _producer(op, "x")
    return op


def _is_square(op: Any) -> bool:
    if op is None:
        return False
    if op.op_type == "square":
        return True
    if op.op_type == "pow":
        y = op.y.val
        return y is not None and np.size(y) == 1 and float(np.asarray(y).reshape(())) == 2.0
    return op.op_type == "mul" and op.x is op.y


def _statistic(op: Any) -> bool:
    """x**2 and the ops that reduce it to a norm: pow -> (shape ops) -> mean -> + eps -> rsqrt."""
    if op is None:
        return False
    if _is_square(op):
        return True
    t = op.op_type
    if t in _SHAPE_OPS or t in _REDUCE_OPS:
        return _statistic(_producer(op, "x"))
    if t == "add":
        return any(_reduced(_through_shape_ops(_producer(op, side))) for side in ("x", "y"))
    if t in ("rsqrt", "sqrt"):
        return _statistic(_producer(op, "x"))
    return False


def _reduced(op: Any) -> bool:
    return op is not None and op.op_type in _REDUCE_OPS and _statistic(op)


def _feeds_trig(op: Any, depth: int = 0) -> bool:
    """Float ops on the way from positions to sin/cos (``pos * inv_freq``): an fp16 angle is
    off by whole radians at position 2048, so RoPE's angles stay fp32."""
    users = op.outputs[0].child_ops if op.outputs else []
    if not users or depth > 4:
        return False
    return all(u.op_type in _TRIG_OPS or (u.op_type in _SHAPE_OPS + ("mul", "real_div", "cast")
                                          and _feeds_trig(u, depth + 1)) for u in users)


def keep_fp32(op: Any) -> bool:
    """The ops that stay fp32 in an fp16 program.

    * RMSNorm statistics: ``x**2`` passes fp16's 65504 once ``|x| > 256``;
    * PLM's squared ReLU and the ``down_proj`` that consumes it (its input would overflow on
      the way back to fp16);
    * RoPE angles and their sin/cos.
    """
    t = op.op_type
    if _statistic(op):
        return True
    if t in _TRIG_OPS:
        return True
    if t in ("linear", "matmul") and _is_square(_through_shape_ops(_producer(op, "x"))):
        return True
    if t in ("mul", "real_div", "cast") + _SHAPE_OPS and _feeds_trig(op):
        return True
    return False


def _fp16_selector(op: Any) -> bool:
    return not keep_fp32(op)


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    # q=3 new tokens after 2 cached ones, a 2-row mask: distinct sizes (none of them 1, which
    # torch.export would specialize) so q, past and the mask rows stay separate symbols.
    return torch.tensor([[1, 2, 3]], dtype=torch.int32), torch.zeros(1, 1, 2, 5, dtype=torch.float16)


def _convert_trace(ct: Any, wrapper: CoreMLDecoder, context: int, precision: Any) -> Any:
    from phonekit.export.coreml_tools import install_torch_frontend_fix

    install_torch_frontend_fix()
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, _example(), check_trace=False)
    q = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="query_length")
    m = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="mask_rows")
    end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="end_step")
    lay = wrapper.layout
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=lay.shape(i), dtype=np.float16), name=lay.names[i])
              for i in range(2)]
    return ct.convert(
        traced,
        inputs=[ct.TensorType(shape=(1, q), dtype=np.int32, name="inputIds"),
                ct.TensorType(shape=(1, 1, m, end), dtype=np.float16, name="causalMask")],
        outputs=[ct.TensorType(dtype=np.float16, name="logits")],
        states=states,
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
        convert_to="mlprogram",
        skip_model_load=True,
    )


def _convert_export(ct: Any, wrapper: CoreMLDecoder, context: int, precision: Any) -> Any:
    from torch.export import Dim

    from phonekit.export.coreml_tools import install_torch_frontend_fix

    install_torch_frontend_fix()
    # torch.export adds a guard (q * D != context * D) for a write covering the whole cache,
    # so one call takes at most context - 1 tokens; a prompt must leave room to generate anyway.
    q = Dim("query_length", min=1, max=context - 1)
    m = Dim("mask_rows", min=1, max=context)
    end = Dim("end_step", min=1, max=context)
    with torch.no_grad():
        ep = torch.export.export(wrapper, _example(), strict=False,
                                 dynamic_shapes={"inputIds": {1: q}, "causalMask": {2: m, 3: end}})
    ep = ep.run_decompositions({})
    mlmodel = ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                         convert_to="mlprogram", skip_model_load=True)
    # torch.export lower-cases placeholder names and names the output after its last op.
    spec = mlmodel.get_spec()
    renames = {i.name: n for i in spec.description.input for n in ("inputIds", "causalMask") if i.name.lower() == n.lower()}
    renames[spec.description.output[0].name] = "logits"
    for old, new in renames.items():
        if old != new:
            ct.utils.rename_feature(spec, old, new)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def metadata(lm: Any, plan: QuantPlan, context: int, method: str) -> dict[str, str]:
    cfg = lm.config
    tok = lm.tokenizer
    bos = tok.bos_id if tok is not None else cfg.bos_token_id
    lay = state_layout(cfg, context)
    return {
        HF_NAME_KEY: lm.hub_id or lm.model_id,
        META_PREFIX + "model_id": lm.model_id,
        META_PREFIX + "family": cfg.family,
        META_PREFIX + "layer_sharing": json.dumps(bool(getattr(cfg, "layer_sharing", False))),
        META_PREFIX + "block_applications": str(cfg.block_applications),
        META_PREFIX + "context": str(context),
        META_PREFIX + "scheme": plan.scheme.name,
        META_PREFIX + "weight_method": json.dumps(plan.scheme.weight_method),  # null for float schemes
        META_PREFIX + "embedding": plan.embedding_scheme.name,
        META_PREFIX + "vocab_size": str(cfg.vocab_size),
        META_PREFIX + "bos_id": json.dumps(bos),
        META_PREFIX + "eos_ids": json.dumps(list(cfg.eos_token_id)),
        META_PREFIX + "states": json.dumps({n: list(lay.shape(i)) for i, n in enumerate(lay.names)}),
        META_PREFIX + "conversion": method,
    }


def convert(lm: Any, plan: QuantPlan, context: int, out: Path, method: str = "trace",
            fp32_ops: bool = True) -> dict[str, Any]:
    """Write ``out`` (an ``.mlpackage``) and return facts for ``Artifact.details``.

    ``fp32_ops=False`` converts every op to fp16 (no ``keep_fp32`` exceptions); it exists to
    measure what the exceptions buy, not for shipping.
    """
    if method not in METHODS:
        raise UsageError(f"coreml conversion method {method!r}: use trace or export")
    check_inputs(lm, plan, context)
    from phonekit.export.coreml_tools import import_coremltools

    ct = import_coremltools()
    model = copy.deepcopy(lm.model).float().eval()
    model.clear_caches()
    apply_head_equalization(model, plan)
    if getattr(model, "naive", False):
        model.naive = False  # the absorbed MLA path is the one that reads the latent cache
    wrapper = CoreMLDecoder(model, context, read_to_end=(method == "trace")).eval()
    fp32 = plan.scheme.base == "fp32"
    selector = _fp16_selector if fp32_ops else (lambda op: True)
    precision = ct.precision.FLOAT32 if fp32 else ct.transform.FP16ComputePrecision(op_selector=selector)
    from phonekit.export.coreml_tools import quiet_conversion

    try:
        with quiet_conversion():
            mlmodel = (_convert_trace if method == "trace" else _convert_export)(ct, wrapper, context, precision)
            from phonekit.export.coreml_quant import finish_weights

            mlmodel, qinfo = finish_weights(mlmodel, model, plan, fp16_program=not fp32)
    except PhonekitError:
        raise
    except Exception as e:  # coremltools raises many types; one line is what the user needs
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"--format coreml: conversion failed ({type(e).__name__}: {first[:300]}); "
                          f"try --format onnx or report the model") from None
    meta = metadata(lm, plan, context, method)
    for k, v in meta.items():
        mlmodel.user_defined_metadata[k] = v
    mlmodel.short_description = f"{lm.model_id} ({plan.scheme.label}), stateful KV cache, context {context}"
    mlmodel.author = "phonekit"
    mlmodel.version = str(meta[META_PREFIX + "scheme"])
    _describe(mlmodel)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))
    make_deterministic(out)
    lay = wrapper.layout
    return {
        "conversion": method,
        "coremltools": ct.__version__,
        "minimum_deployment_target": "iOS18 / macOS15",
        "compute_precision": "fp32" if fp32 else (
            "fp16; fp32 for RMSNorm statistics, RoPE angles, PLM squared ReLU + down_proj" if fp32_ops else "fp16 (all ops)"),
        "compute_units": "cpuAndGPU",
        "shapes": ("one function, RangeDim query length for prefill and decode (not multifunction): "
                   "swift-transformers needs a ranged length; the Neural Engine runs range-flexible "
                   "models only at the default shape, so target CPU+GPU"),
        "inputs": {"inputIds": "int32 [1, q], 1 <= q <= " + str(context if method == "trace" else context - 1),
                   "causalMask": "fp16 [1, 1, m, past + q]; only the last dimension is read"},
        "outputs": {"logits": "fp16 [1, q, vocab]"},
        "states": {n: {"shape": list(lay.shape(i)), "dtype": "fp16"} for i, n in enumerate(lay.names)},
        "swift_transformers_compatible": lm.config.family == "mobilellm",
        "weights": qinfo,
        "metadata": meta,
    }


def _describe(mlmodel: Any) -> None:
    spec_desc = {
        "inputIds": "new token ids, int32 [1, q]",
        "causalMask": "fp16 [1, 1, m, past + q]: its last dimension gives past + q; values are not read",
        "logits": "fp16 [1, q, vocab]",
    }
    for name, text in spec_desc.items():
        if name == "logits":
            mlmodel.output_description[name] = text
        else:
            mlmodel.input_description[name] = text


def make_deterministic(package: Path) -> None:
    """Same model, same bytes: coremltools names package items with random uuid4 keys and
    protobuf (upb) writes map fields in a per-process order. Re-serialize the spec
    deterministically and derive the item ids from their paths."""
    import json
    import uuid

    from coremltools.proto import Model_pb2

    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    remap = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "phonekit-mlpackage/" + item["path"]))
             for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {remap[k]: v for k, v in sorted(manifest["itemInfoEntries"].items(), key=lambda kv: remap[kv[0]])}
    manifest["rootModelIdentifier"] = remap[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def export(lm: Any, plan: QuantPlan, context: int, root: Path, steps: Any) -> Any:
    """The exporter contract: writes ``root/model.mlpackage`` and returns its ``Artifact``."""
    check_inputs(lm, plan, context)
    with steps.step("coreml: trace + convert + quantize"):
        # Convert into a scratch folder inside root, then move: a failure leaves nothing behind.
        tmp = Path(tempfile.mkdtemp(prefix=".coreml-", dir=root))
        try:
            details = convert(lm, plan, context, tmp / PACKAGE)
            shutil.move(str(tmp / PACKAGE), str(Path(root) / PACKAGE))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    details["weight_file_bytes"] = (Path(root) / PACKAGE / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    return Artifact(
        format="coreml",
        file=PACKAGE,
        backend="coreml",
        platforms=["ios", "macos"],
        runtime=f"coremltools {version('coremltools')} (Core ML, iOS 18+ / macOS 15+)",
        details=details,
    )


__all__ = ["METHODS", "PACKAGE", "check_inputs", "convert", "export", "keep_fp32", "metadata"]
