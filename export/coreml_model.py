"""The module that is converted to Core ML: a phonekit ``Transformer`` whose per-layer
caches are slots of two stacked fp16 buffers, which become the model's Core ML states.

Core ML states are fixed-shape fp16 tensors (``ct.StateType``; flexible state shapes are not
supported, apple/coremltools#2537), so each family gets two state tensors of shape
``[slots, 1, N, context, D]`` with one slot per *block application* (MobileLLM-LS: 2 x layers;
the shared block's weights are still stored once because the same module runs twice):

| family    | state ``a`` (N, D)                                | state ``b`` (N, D)                          |
|-----------|---------------------------------------------------|---------------------------------------------|
| mobilellm | ``keyCache`` (kv heads, head_dim): rotated K      | ``valueCache`` (kv heads, head_dim): V      |
| plm       | ``latentCache`` (1, kv_lora_rank): normalized c   | ``ropeKeyCache`` (1, qk_rope_head_dim): k_pe |

The MobileLLM names are the ones swift-transformers' ``LanguageModelWithStatefulKVCache``
looks up. PLM keeps MLA's compressed latent (not decompressed K/V), so its names differ on
purpose: a Swift app drives it with phonekit's own loop, not swift-transformers.

Inputs (names from swift-transformers' ``LanguageModel.Keys``):

* ``inputIds`` int32 ``[1, q]``: the new tokens.
* ``causalMask`` fp16 ``[1, 1, m, past + q]``: only its last dimension is read. It says where
  the new tokens go (positions ``past .. past+q-1``); the model masks causally by itself, so
  the zeros mask of shape ``[1, 1, 1, tokenCount + 1]`` that swift-transformers passes works.
* Output ``logits`` fp16 ``[1, q, vocab]``.

The wrapper runs the model's own ``forward(tokens, input_pos)``: only the cache objects are
replaced (``SlotCache``, the ``KVCache`` contract), so the converted graph is the eager graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from phonekit.errors import ExportError


@dataclass(frozen=True)
class StateLayout:
    """Names and shapes of the two state tensors of one exported model."""

    names: tuple[str, str]
    slots: int
    heads: int
    context: int
    dims: tuple[int, int]

    def shape(self, which: int) -> tuple[int, int, int, int, int]:
        return (self.slots, 1, self.heads, self.context, self.dims[which])


STATE_NAMES = {"mobilellm": ("keyCache", "valueCache"), "plm": ("latentCache", "ropeKeyCache")}


def state_layout(config: Any, context: int) -> StateLayout:
    fam = config.family
    if fam == "mobilellm":
        return StateLayout(STATE_NAMES[fam], config.block_applications, config.num_key_value_heads, context,
                           (config.head_dim, config.head_dim))
    if fam == "plm":
        return StateLayout(STATE_NAMES[fam], config.block_applications, 1, context,
                           (config.kv_lora_rank, config.qk_rope_head_dim))
    raise ExportError(f"--format coreml: model family {fam!r} has no Core ML layout; use --format onnx")


class SlotCache(nn.Module):
    """One block application's view of the stacked state buffers.

    Same contract as ``models.common.KVCache`` (``max_len``, ``update(pos, a, b) -> (a_all,
    b_all)``): the new entries are written at the positions the wrapper derived from the input
    shapes (a slice assignment, which converts to ``slice_update`` + a state write) and the slot
    is returned, so the model's own causal mask hides every position after the query.
    """

    def __init__(self, owner: "CoreMLDecoder", slot: int) -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a child module (cycle)
        self.slot = slot

    @property
    def max_len(self) -> Any:
        o = self._owner[0]
        # Reading only 0..past+q keeps attention as short as the text (Apple's and HF's
        # stateful examples do this); the torch.export path attends over the whole slot,
        # because torch.export guards a dynamic slice that may reach the full length.
        return o.span[1] if o.read_to_end else o.layout.context

    def update(self, pos: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self._owner[0]
        sa, sb = o.state_tensors()
        begin, end = o.span
        sa[self.slot, :, :, begin:end, :] = a.to(sa.dtype)
        sb[self.slot, :, :, begin:end, :] = b.to(sb.dtype)
        if o.read_to_end:
            return sa[self.slot, :, :, :end, :], sb[self.slot, :, :, :end, :]
        return sa[self.slot], sb[self.slot]


class CoreMLDecoder(nn.Module):
    """``forward(inputIds[1, q] int32, causalMask[1, 1, m, past+q] fp16) -> logits[1, q, V]``."""

    def __init__(self, model: nn.Module, context: int, read_to_end: bool = True) -> None:
        super().__init__()
        cfg = model.args
        self.m = model
        self.family = cfg.family
        self.layout = state_layout(cfg, context)
        self.read_to_end = read_to_end
        for i, name in enumerate(self.layout.names):
            self.register_buffer(name, torch.zeros(self.layout.shape(i), dtype=torch.float16))
        model.caches = nn.ModuleList(SlotCache(self, i) for i in range(self.layout.slots))
        self.span: tuple[Any, Any] = (0, 0)

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self.layout.names[0]), getattr(self, self.layout.names[1])

    def forward(self, inputIds: torch.Tensor, causalMask: torch.Tensor) -> torch.Tensor:  # noqa: N803 - Core ML feature names
        q = inputIds.shape[-1]
        end = causalMask.shape[-1]
        begin = end - q
        self.span = (begin, end)
        return self.m(inputIds, torch.arange(begin, end))
