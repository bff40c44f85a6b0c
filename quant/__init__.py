"""Quantization: named schemes, per-model plans, the fake-quant reference, and torchao application."""

from phonekit.quant.plan import QuantPlan, make_plan
from phonekit.quant.schemes import EmbeddingScheme, Scheme, check_format, parse_embedding, parse_scheme

__all__ = ["EmbeddingScheme", "QuantPlan", "Scheme", "check_format", "make_plan", "parse_embedding", "parse_scheme"]
