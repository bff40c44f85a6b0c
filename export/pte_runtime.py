"""Run a bundle's ``.pte`` on this machine with ExecuTorch's Python runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from phonekit.errors import BundleError


class PteSession:
    """``forward(tokens, start_pos)``: the KV cache lives in the loaded method's
    mutable buffers. Entries past the current position are never attended to (the
    causal rule masks keys above each query's position), so ``reset`` is free."""

    def __init__(self, path: Path, context: int) -> None:
        from executorch.runtime import Runtime

        import executorch.kernels.quantized  # noqa: F401 - registers quantized embedding kernels
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - llama::* kernels

        try:
            program = Runtime.get().load_program(str(path))
            self.method = program.load_method("forward")
        except Exception as e:  # the runtime raises RuntimeError with a status code
            raise BundleError(f"{path}: ExecuTorch cannot load it ({e}); re-export the bundle") from None
        self.context = context

    def reset(self) -> None:
        pass

    def forward(self, tokens: list[int], start_pos: int) -> np.ndarray:
        t = torch.tensor([tokens], dtype=torch.long)
        pos = torch.arange(start_pos, start_pos + len(tokens), dtype=torch.long)
        out = self.method.execute((t, pos))[0]
        return out.reshape(-1, out.shape[-1])[-1].float().numpy()


def open_session(bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any]) -> PteSession:
    return PteSession(Path(bundle) / artifact["file"], int(manifest["context_length"]))
