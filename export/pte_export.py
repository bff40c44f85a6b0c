"""ExecuTorch export: torch.export -> torchao quantization -> XNNPACK lowering -> .pte.

The program has one method, ``forward(tokens[1, S], input_pos[S]) -> logits[1, V]``
(last position), with the static KV cache as mutable buffers and S dynamic up to
the context length, plus the constant methods ExecuTorch's C++ LLM runner reads
(``get_max_seq_len``, ``get_max_context_len``, ``get_eos_ids``, ...). The runner's
``get_max_seq_len`` equals the cache length: a smaller one makes the 1.5.1 runner
treat the model as sliding-window and run past the cache. Projections that read the
same input (q/k/v, gate/up) are merged into one linear each before export (quant.fuse).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phonekit.errors import ExportError
from phonekit.export.bundle import Artifact
from phonekit.quant.fuse import fuse_projections
from phonekit.quant.plan import QuantPlan

PTE_NAME = "model.pte"


class LastTokenLogits(nn.Module):
    """The calling convention of ExecuTorch's LLM runner: logits of the last position only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos, last_only=True)[:, -1, :]


class EtKVCache(nn.Module):
    """One cache slot in the layout ExecuTorch's ``llama::update_cache`` writes: [B, max_len, H_kv, D]."""

    def __init__(self, max_len: int, n_kv: int, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(1, max_len, n_kv, head_dim), persistent=False)
        self.register_buffer("v", torch.zeros(1, max_len, n_kv, head_dim), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


class CustomSdpaAttention(nn.Module):
    """MobileLLM attention on ExecuTorch's LLM ops: ``llama::update_cache`` writes the new
    K/V in place and ``llama::custom_sdpa`` attends causally from ``start_pos`` (GQA-aware,
    fp32, never materializing a [H, S, max_len] score tensor). Same math as the eager path."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x, cos, sin, input_pos, mask, cache):  # noqa: ANN001 - same signature as Attention
        a = self.attn
        bsz, seq, _ = x.shape
        rope = a.rope[0]
        q, k, v = a.project(x)
        q = rope(q.view(bsz, seq, a.n_heads, a.head_dim), cos, sin)
        k = rope(k.view(bsz, seq, a.n_kv, a.head_dim), cos, sin)
        v = v.view(bsz, seq, a.n_kv, a.head_dim)
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seq <= cache.max_len)
        torch.ops.llama.update_cache(k, cache.k, start)
        torch.ops.llama.update_cache(v, cache.v, start)
        o = torch.ops.llama.custom_sdpa(q, cache.k, cache.v, start, None, 0, True)
        return a.o_proj(o.reshape(bsz, seq, a.n_heads * a.head_dim))


def use_custom_ops(model: nn.Module, context: int) -> None:
    """Swap the MobileLLM attention/caches for ExecuTorch's LLM custom ops (in place)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - registers llama::* for export

    args = model.args
    for block in model.layers:
        block.self_attn = CustomSdpaAttention(block.self_attn)
    model.caches = nn.ModuleList(
        EtKVCache(context, args.num_key_value_heads, args.head_dim) for _ in range(args.block_applications))


def runner_metadata(lm: Any, context: int, fused: bool = False) -> dict[str, Any]:
    cfg = lm.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else (lm.tokenizer.bos_id if lm.tokenizer else None)
    meta: dict[str, Any] = {
        "get_max_seq_len": context,
        "get_max_context_len": context,
        "get_vocab_size": cfg.vocab_size,
        "get_n_layers": cfg.block_applications,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": fused,
        "enable_dynamic_shape": True,
        "get_eos_ids": list(cfg.eos_token_id),
    }
    if bos is not None:
        meta["get_bos_id"] = int(bos)
    return meta


def prepare(lm: Any, plan: QuantPlan, context: int, custom_ops: bool | None = None) -> nn.Module:
    """A float32 copy of the model with a static cache of ``context`` slots, quantized per ``plan``.

    ``custom_ops`` (default: on for the MobileLLM family) uses ExecuTorch's fused KV-cache
    update and SDPA; PLM's MLA has different key and value widths, which ``custom_sdpa``
    does not take, so it keeps the decomposed attention XNNPACK partially delegates.
    """
    from phonekit.quant.torchao_apply import apply_plan

    model = (copy.deepcopy(lm.model) if lm.reusable else lm.model).float().eval()
    model.clear_caches()
    model.setup_caches(context, dtype=torch.float32)
    if not plan.scheme.is_float or plan.embedding is not None:
        apply_plan(model, plan)
    if custom_ops is None:
        custom_ops = lm.config.family == "mobilellm"
    if custom_ops:
        use_custom_ops(model, context)
    return model


def export_program(model: nn.Module, context: int):  # noqa: ANN201 - torch ExportedProgram
    from torch.export import Dim, export
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = Dim("seq_len", min=1, max=context)
    example = (torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        # No run_decompositions here: to_edge_transform_and_lower functionalizes and
        # decomposes itself, and every extra retrace of a 30-layer graph costs minutes.
        return export(LastTokenLogits(model), example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)


def lower(ep: Any, metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=metadata,
    )
    info = get_delegation_info(edge.exported_program().graph_module)
    delegation = {
        "delegated_nodes": int(info.num_delegated_nodes),
        "non_delegated_nodes": int(info.num_non_delegated_nodes),
        "delegated_share": round(info.num_delegated_nodes / max(1, info.num_delegated_nodes + info.num_non_delegated_nodes), 4),
        "delegated_subgraphs": int(info.num_delegated_subgraphs),
    }
    et = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # fuses dequantize+embedding into quantized embedding ops
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))
    return et, delegation


def export(lm: Any, plan: QuantPlan, context: int, root: Path, steps: Any, custom_ops: bool | None = None) -> Artifact:
    from importlib.metadata import version

    with steps.step("quantize (torchao)"):
        model = prepare(lm, plan, context, custom_ops)
        fused = isinstance(model.layers[0].self_attn, CustomSdpaAttention)
        merged = fuse_projections(model)
    with steps.step("torch.export"):
        try:
            ep = export_program(model, context)
        except Exception as e:  # torch.export raises many error types; report the first line
            raise ExportError(f"torch.export failed for {lm.model_id}: {str(e).splitlines()[0]}") from e
    with steps.step("lower to XNNPACK"):
        et, delegation = lower(ep, runner_metadata(lm, context, fused))
    with steps.step("serialize .pte"):
        (root / PTE_NAME).write_bytes(et.buffer)
    planned = [int(b) for b in et.executorch_program.execution_plan[0].non_const_buffer_sizes]
    return Artifact(
        format="pte",
        file=PTE_NAME,
        backend="xnnpack",
        platforms=["android", "ios"],
        runtime=f"executorch {version('executorch').split('+')[0]}",
        details={
            "method": "forward(tokens[1,S] int64, input_pos[S] int64) -> logits[1,V] float32",
            "max_seq_len": context,
            "kv_cache": "fp32 mutable buffers, one slot per block application"
            + (", [1, ctx, n_kv, head_dim] (llama::update_cache)" if fused else ""),
            "attention": "llama::custom_sdpa (ExecuTorch LLM custom op)" if fused else "decomposed (matmul/softmax)",
            "fused_projections": merged,
            "memory_planned_bytes": sum(planned),
            "delegation": delegation,
            "runner_metadata": runner_metadata(lm, context, fused),
        },
    )
