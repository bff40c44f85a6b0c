"""``LanguageModel``: a loaded model with its tokenizer, full-forward logits and
greedy generation through the static KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from phonekit.export.models import ModelArgs, num_params
from phonekit.export.tokenizer import Tokenizer


@dataclass
class LanguageModel:
    model: nn.Module
    config: ModelArgs
    tokenizer: Tokenizer | None
    model_id: str
    source: str  # "preset" | "hf" | "gguf" | "hub" | "random"
    license: str | None = None
    hub_id: str | None = None
    gguf_types: dict[str, str] = field(default_factory=dict)
    # False once the caller no longer needs ``model`` (the last format of an export):
    # an exporter may then quantize it in place instead of deep-copying, which halves
    # the peak memory of a 1.8B export.
    reusable: bool = True

    @property
    def family(self) -> str:
        return self.config.family

    def num_params(self) -> int:
        return num_params(self.model)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full forward, no cache: LongTensor [1, T] -> FloatTensor [1, T, vocab]."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        saved = self.model.caches
        self.model.clear_caches()
        try:
            return self.model(ids, torch.arange(ids.shape[1])).float()
        finally:
            self.model.caches = saved

    @torch.no_grad()
    def stream(self, ids: list[int] | torch.Tensor, max_new_tokens: int = 32, stop: bool = True) -> Iterator[int]:
        """Greedy tokens through the KV cache: one prefill, then one token per step."""
        prompt = torch.as_tensor(ids, dtype=torch.long).flatten()
        n = prompt.numel()
        total = min(n + max_new_tokens, self.config.max_context)
        saved = self.model.caches
        self.model.setup_caches(total)
        try:
            logits = self.model(prompt[None], torch.arange(n), last_only=True)
            pos = n
            while True:
                tok = int(logits[0, -1].argmax())
                yield tok
                if (stop and tok in self.config.eos_token_id) or pos >= total:
                    return
                if pos - n + 1 >= max_new_tokens:
                    return
                logits = self.model(torch.tensor([[tok]]), torch.tensor([pos]), last_only=True)
                pos += 1
        finally:
            self.model.caches = saved

    def generate(self, ids: list[int] | torch.Tensor, max_new_tokens: int = 32, stop: bool = True,
                 on_token: Callable[[int], Any] | None = None) -> list[int]:
        """Greedy decode; returns the new token ids (EOS included when it ends the text)."""
        out = []
        for tok in self.stream(ids, max_new_tokens, stop):
            out.append(tok)
            if on_token is not None:
                on_token(tok)
        return out
