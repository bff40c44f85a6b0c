"""ExecuTorch export: torch.export -> torchao quantization -> XNNPACK lowering -> .pte.

The program has one method, ``forward(tokens[1, S], input_pos[S]) -> logits[1, V]``
(last position), with the static KV cache as mutable buffers and S dynamic up to
the context length, plus the constant methods ExecuTorch's C++ LLM runner reads
(``get_max_seq_len``, ``get_max_context_len``, ``get_eos_ids``, ...). The runner's
``get_max_seq_len`` equals the cache length: a smaller one makes the 1.5.1 runner
treat the model as sliding-window and run past the cache.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phonekit.errors import ExportError
from phonekit.export.bundle import Artifact
from phonekit.quant.plan import QuantPlan

PTE_NAME = "model.pte"


class LastTokenLogits(nn.Module):
    """The calling convention of ExecuTorch's LLM runner: logits of the last position only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos, last_only=True)[:, -1, :]


def runner_metadata(lm: Any, context: int) -> dict[str, Any]:
    cfg = lm.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else (lm.tokenizer.bos_id if lm.tokenizer else None)
    meta: dict[str, Any] = {
        "get_max_seq_len": context,
        "get_max_context_len": context,
        "get_vocab_size": cfg.vocab_size,
        "get_n_layers": cfg.block_applications,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_eos_ids": list(cfg.eos_token_id),
    }
    if bos is not None:
        meta["get_bos_id"] = int(bos)
    return meta


def prepare(lm: Any, plan: QuantPlan, context: int) -> nn.Module:
    """A float32 copy of the model with a static cache of ``context`` slots, quantized per ``plan``."""
    from phonekit.quant.torchao_apply import apply_plan

    model = copy.deepcopy(lm.model).float().eval()
    model.clear_caches()
    model.setup_caches(context, dtype=torch.float32)
    if not plan.scheme.is_float or plan.embedding is not None:
        apply_plan(model, plan)
    return model


def export_program(model: nn.Module, context: int):  # noqa: ANN201 - torch ExportedProgram
    from torch.export import Dim, export
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = Dim("seq_len", min=1, max=context)
    example = (torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ep = export(LastTokenLogits(model), example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    return ep.run_decompositions({})


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


def export(lm: Any, plan: QuantPlan, context: int, root: Path, steps: Any) -> Artifact:
    from importlib.metadata import version

    with steps.step("quantize (torchao)"):
        model = prepare(lm, plan, context)
    with steps.step("torch.export"):
        try:
            ep = export_program(model, context)
        except Exception as e:  # torch.export raises many error types; report the first line
            raise ExportError(f"torch.export failed for {lm.model_id}: {str(e).splitlines()[0]}") from e
    with steps.step("lower to XNNPACK"):
        et, delegation = lower(ep, runner_metadata(lm, context))
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
            "kv_cache": "fp32 mutable buffers, one slot per block application",
            "memory_planned_bytes": sum(planned),
            "delegation": delegation,
            "runner_metadata": runner_metadata(lm, context),
        },
    )
