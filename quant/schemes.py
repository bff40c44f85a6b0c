"""Named quantization schemes, one meaning each.

| scheme        | weights                                   | activations                     |
|---------------|-------------------------------------------|---------------------------------|
| fp32, fp16    | float                                     | float                           |
| w8            | int8, per output channel, symmetric       | float                           |
| w4[-gN]       | int4, groups of N input channels (32)     | float                           |
| 8da8w         | int8, per output channel, symmetric       | int8 per token, min/max (asym.) |
| 8da4w[-gN]    | int4, groups of N input channels (32)     | int8 per token, min/max (asym.) |

Embedding quantization is a separate choice (``8w`` per row, ``4w`` groups of 32);
a tied output head follows the embedding's choice, so the shared matrix is stored
and quantized one way. The pure-PyTorch meaning of each scheme is in
``phonekit.quant.reference``; every backend is tested against it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from phonekit.errors import QuantError

DEFAULT_GROUP = 32
WEIGHT_SCHEMES = ("fp32", "fp16", "w8", "w4", "8da8w", "8da4w")
EMBEDDING_SCHEMES = ("none", "8w", "4w")
_RE = re.compile(r"^(fp32|fp16|w8|w4|8da8w|8da4w)(?:-g(\d+))?(?::([a-z-]+))?$")

# How quantized weights are rounded (the meaning of each is in ``quant.reference``):
# sym = symmetric min/max (torchao's default, scale = max|w| / 7.5 for int4);
# sym-search / hqq = symmetric with an error-minimizing scale per group;
# asym = integer zero point per group; affine = float offset per group (min/max);
# affine-search = float offset with scale and offset fitted by least squares.
WEIGHT_METHODS = ("sym", "asym", "affine", "sym-search", "affine-search", "hqq")
OFFSET_METHODS = ("asym", "affine", "affine-search")
# What ``--quant 8da4w`` means without ``:METHOD``: the rounding that measured best on the
# demo and that every format runs correctly (README, "Quantization quality"). On the .pte
# its offsets cost decode speed (README, "Benchmarks"); ``:sym`` is the fast alternative.
DEFAULT_METHOD = {4: "affine-search", 8: "sym"}


@dataclass(frozen=True)
class Scheme:
    base: str  # one of WEIGHT_SCHEMES
    group_size: int | None  # int4 groups; None for per-channel int8 and float
    method: str | None = None  # weight rounding (WEIGHT_METHODS); None = DEFAULT_METHOD

    @property
    def weight_method(self) -> str | None:
        """The weight rounding actually used (None for float schemes)."""
        if self.is_float:
            return None
        return self.method or DEFAULT_METHOD[self.weight_bits]

    @property
    def name(self) -> str:
        return f"{self.base}-g{self.group_size}" if self.weight_bits == 4 else self.base

    @property
    def weight_bits(self) -> int | None:
        return {"w8": 8, "8da8w": 8, "w4": 4, "8da4w": 4}.get(self.base)

    @property
    def dynamic_act(self) -> bool:
        """int8 activations quantized per token with min/max at run time."""
        return self.base.startswith("8da")

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None

    @property
    def float_dtype(self) -> str:
        return "fp16" if self.base == "fp16" else "fp32"

    def describe(self) -> dict[str, Any]:
        m = self.weight_method
        w = "float" if self.is_float else (
            ("int8 per output channel" if self.weight_bits == 8 else f"int4 groups of {self.group_size}")
            + ", " + METHOD_WORDS[m])
        a = "int8 per token, dynamic min/max (asymmetric)" if self.dynamic_act else "float"
        return {"scheme": self.name, "weights": w, "weight_method": m, "activations": a, "weight_bits": self.weight_bits,
                "group_size": self.group_size, "dynamic_activations": self.dynamic_act}

    @property
    def label(self) -> str:
        """The name with an explicitly chosen weight method, as the user wrote it (8da4w-g32:sym)."""
        return self.name + (f":{self.method}" if self.method else "")


METHOD_WORDS = {
    "sym": "symmetric (min/max scale)",
    "sym-search": "symmetric, error-minimizing scale per group",
    "hqq": "symmetric, HQQ scale per group",
    "asym": "integer zero point per group (min/max)",
    "affine": "float offset per group (min/max)",
    "affine-search": "float offset per group, scale and offset fitted by least squares",
}


def parse_scheme(text: str) -> Scheme:
    m = _RE.match(text.strip().lower())
    if not m:
        raise QuantError(
            f"--quant {text!r}: unknown scheme; use one of fp32, fp16, w8, w4, w4-g64, 8da8w, 8da4w, 8da4w-g64 "
            f"(groups: -gN; weight rounding: :METHOD, e.g. 8da4w:sym)"
        )
    base, g, method = m.group(1), m.group(2), m.group(3)
    if method is not None and method not in WEIGHT_METHODS:
        raise QuantError(f"--quant {text!r}: unknown weight rounding {method!r}; use one of {', '.join(WEIGHT_METHODS)}")
    if method is not None and base in ("fp32", "fp16"):
        raise QuantError(f"--quant {text!r}: {base} has no quantized weights to round; drop :{method}")
    if g is not None and base not in ("w4", "8da4w"):
        raise QuantError(f"--quant {text!r}: a group size applies to the 4-bit schemes only (w4-gN, 8da4w-gN)")
    group = int(g) if g is not None else (DEFAULT_GROUP if base in ("w4", "8da4w") else None)
    if group is not None and (group < 8 or group & (group - 1)):
        raise QuantError(f"--quant {text!r}: group size {group} must be a power of two >= 8 (32, 64, 128, ...)")
    return Scheme(base, group, method)


def scheme_from_manifest(quantization: dict[str, Any]) -> Scheme:
    """The scheme a bundle was exported with, from its manifest's ``quantization`` record."""
    method = quantization.get("weight_method")
    return parse_scheme(quantization["scheme"] + (f":{method}" if method else ""))


@dataclass(frozen=True)
class EmbeddingScheme:
    bits: int | None  # None = float
    group_size: int | None  # None = per row
    auto: bool = False  # resolved per model by ``resolve``

    @property
    def name(self) -> str:
        if self.auto:
            return "auto"
        return "none" if self.bits is None else f"{self.bits}w"

    def resolve(self, scheme: Scheme, tied: bool) -> "EmbeddingScheme":
        """``auto``: int8 per row when the weights are quantized and the head is tied.

        The tied head reads the whole vocabulary every token; at 4 bits it costs a large
        share of the quality loss (../shared/reference/quantization.md), at float it is the
        largest tensor of a small model (stored twice in a .pte: embedding + XNNPACK head)."""
        if not self.auto:
            return self
        return EmbeddingScheme(8, None) if (tied and not scheme.is_float) else EmbeddingScheme(None, None)


def parse_embedding(text: str | None) -> EmbeddingScheme:
    t = (text or "none").strip().lower()
    if t == "auto":
        return EmbeddingScheme(None, None, auto=True)
    if t == "none":
        return EmbeddingScheme(None, None)
    if t == "8w":
        return EmbeddingScheme(8, None)
    if t == "4w":
        return EmbeddingScheme(4, DEFAULT_GROUP)
    raise QuantError(f"--quant-embedding {text!r}: use auto, none, 8w (int8 per row) or 4w (int4 groups of 32)")


# What each format can run correctly. ExecuTorch/XNNPACK 1.5.1 delegates weight-only
# int4/int8 linears but computes wrong outputs or stores fp32-sized weights, so .pte
# refuses them; Core ML has no dynamic activation quantization.
FORMAT_SCHEMES: dict[str, tuple[str, ...]] = {
    "pte": ("fp32", "8da8w", "8da4w"),
    "onnx": ("fp32", "fp16", "w8", "w4", "8da8w", "8da4w"),
    "coreml": ("fp32", "fp16", "w8", "w4"),
}
_ALTERNATIVE = {
    ("pte", "w4"): "8da4w", ("pte", "w8"): "8da8w", ("pte", "fp16"): "fp32",
    ("coreml", "8da4w"): "w4", ("coreml", "8da8w"): "w8",
}
_WHY = {
    "pte": "ExecuTorch's XNNPACK backend computes weight-only linears wrongly in 1.5.1",
    "coreml": "Core ML has no per-token dynamic activation quantization",
}


# Groups per block of ONNX's int8 offset correction (quant.reference.BlockCorrectedLinear):
# MatMulNBits' 8-bit blocks, over which the offsets share a scale and the group sums are rounded.
CORRECTION_BLOCK = 32

# Smallest int4 group XNNPACK's blockwise kernels take (the ONNX exporter checks
# MatMulNBits' own minimum of 16 itself).
MIN_GROUP = {"pte": 32}


def check_format(scheme: Scheme, fmt: str) -> None:
    allowed = FORMAT_SCHEMES.get(fmt)
    if allowed is None:
        raise QuantError(f"--format {fmt!r}: unknown format; use pte, onnx or coreml")
    low = MIN_GROUP.get(fmt)
    if scheme.group_size is not None and low is not None and scheme.group_size < low and scheme.base in allowed:
        raise QuantError(f"--quant {scheme.name}: --format {fmt} needs int4 groups of at least {low}; use --quant {scheme.base}-g{low}")
    if scheme.base not in allowed:
        alt = _ALTERNATIVE.get((fmt, scheme.base), allowed[-1])
        if alt in ("w4", "8da4w") and scheme.group_size:
            alt = f"{alt}-g{scheme.group_size}"
        why = _WHY.get(fmt, "not supported")
        raise QuantError(f"--quant {scheme.name} is not available for --format {fmt} ({why}); use --quant {alt}")


def check_groups(scheme: Scheme, in_features: dict[str, int]) -> None:
    """Every quantized linear's input width must be a multiple of the group size."""
    if scheme.group_size is None:
        return
    bad = {n: f for n, f in in_features.items() if f % scheme.group_size}
    if bad:
        name, width = next(iter(bad.items()))
        fits = [g for g in (128, 64, 32, 16) if all(f % g == 0 for f in in_features.values())]
        hint = f"use --quant {scheme.base}-g{fits[0]}" if fits else "use a per-channel scheme (8da8w or w8)"
        raise QuantError(
            f"--quant {scheme.name}: group size {scheme.group_size} does not divide the input width {width} of {name} "
            f"({len(bad)} layers); {hint}"
        )


def scheme_dict(scheme: Scheme, emb: EmbeddingScheme) -> dict[str, Any]:
    d = scheme.describe()
    d["embedding"] = asdict(emb) | {"name": emb.name}
    return d
