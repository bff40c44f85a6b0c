"""Quantization quality: perplexity, its relative change and teacher-forced top-1
agreement of a quantized model against fp32 on the same tokens.

How a text is scored (``make_windows``): the text is tokenized once without BOS, capped
at ``max_tokens`` tokens and cut into non-overlapping windows of ``context`` tokens.
Each window is one full causal forward from position 0 (no state carried between
windows); every token after the first of a window is a target, predicted from the
tokens before it in that window. A model whose tokenizer adds BOS gets BOS in front
of every window instead, and then every text token is a target. The fp32 model's
per-target negative log-likelihood and argmax are computed once per window
(``FloatReference``) and reused by every scheme, variant and sensitivity probe.

- perplexity = exp(mean NLL over all targets);
- relative change = ppl(scheme) / ppl(fp32) - 1;
- top-1 agreement = share of targets where argmax(scheme logits) == argmax(fp32 logits).
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phonekit.errors import PlanOptionError, QuantError, UsageError
from phonekit.quant.equalize import apply_head_equalization
from phonekit.quant.plan import OFFSET_CHOICES, QuantPlan, make_plan
from phonekit.quant.reference import fake_quantize_model
from phonekit.quant.schemes import WEIGHT_METHODS
from phonekit.quant.schemes import EmbeddingScheme, Scheme, parse_embedding, parse_scheme
from phonekit.quant.smooth import DEFAULT_ALPHA, smooth_model

DEFAULT_CONTEXT = 512
# 16 windows of 512. SmolLM2-135M's fp32 forward over 512 tokens measured 7.8 s on the
# project's 2-core machine (shared with other jobs; 30-60 s when it was loaded 4-6x), so
# fp32 + one scheme takes about 4 minutes there. Every scheme is scored on the same 8k
# tokens, so differences between schemes are paired and far more stable than the
# perplexity itself; --max-tokens trades time for precision.
DEFAULT_MAX_TOKENS = 8192
EVAL_TEXT = "eval_text.txt"
BACKENDS = ("reference", "torchao")

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [S] -> logits [S, V]


def default_text_path() -> Path:
    """The shipped evaluation text (Botchan, English translation of 1919; see EVAL_TEXT_SOURCE.md)."""
    return Path(str(resources.files("phonekit") / "data" / EVAL_TEXT))


def read_text(path: Path | None) -> tuple[str, Path]:
    path = Path(path) if path is not None else default_text_path()
    if not path.is_file():
        raise UsageError(f"--text {path}: no such file; give a UTF-8 text file (or leave --text out for the shipped text)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UsageError(f"--text {path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise UsageError(f"--text {path}: the file is empty; give a text with at least a few hundred words")
    return text, path


@dataclass
class Windows:
    """Token windows of one text: ``inputs[i]`` is fed to the model from position 0 and
    ``targets[i]`` are the tokens its positions ``0 .. len-2`` predict (``inputs[i][1:]``)."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    context: int
    text_tokens: int  # text tokens used (after the cap)
    total_text_tokens: int  # text tokens in the whole file
    bos: bool

    @property
    def num_targets(self) -> int:
        return sum(int(t.numel()) for t in self.targets)


def make_windows(ids: Sequence[int], context: int, max_tokens: int | None, bos_id: int | None = None) -> Windows:
    if context < 2:
        raise UsageError(f"--context {context}: must be at least 2")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens {max_tokens}: must be at least 2")
    total = len(ids)
    ids = list(ids)[: max_tokens] if max_tokens is not None else list(ids)
    step = context - 1 if bos_id is not None else context
    inputs, targets = [], []
    for start in range(0, len(ids), step):
        chunk = torch.tensor(ids[start:start + step], dtype=torch.long)
        if bos_id is not None:
            inputs.append(torch.cat([torch.tensor([bos_id]), chunk]))
            targets.append(chunk)
        elif chunk.numel() >= 2:
            inputs.append(chunk)
            targets.append(chunk[1:])
    if not inputs:
        raise UsageError(f"the evaluation text has {total} token(s); it needs at least 2")
    return Windows(inputs, targets, context, len(ids), total, bos_id is not None)


def tokenize(tokenizer: Any, text: str, context: int, max_tokens: int | None) -> Windows:
    ids = tokenizer.encode(text, add_bos=False)
    bos = tokenizer.bos_id if tokenizer.add_bos and tokenizer.bos_id is not None else None
    return make_windows(ids, context, max_tokens, bos)


def model_logits_fn(model: nn.Module) -> LogitsFn:
    """Full causal forward without the KV cache: ids [S] -> fp32 logits [S, V]."""

    @torch.inference_mode()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        saved = model.caches
        model.clear_caches()
        try:
            return model(ids[None], torch.arange(ids.numel())).float()[0]
        finally:
            model.caches = saved

    return fn


def score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target NLL (float64) and argmax. Position p predicts token p + 1, so the
    positions 0 .. S-2 of a window of S = len(targets) + 1 inputs predict its targets."""
    if logits.shape[0] != targets.numel() + 1:
        raise ValueError(f"{logits.shape[0]} positions for {targets.numel()} targets; expected one more position")
    lg = logits[:-1].float()
    nll = -F.log_softmax(lg, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return nll.double(), lg.argmax(-1)


@dataclass
class WindowScores:
    nll: list[torch.Tensor] = field(default_factory=list)
    argmax: list[torch.Tensor] = field(default_factory=list)


def run_scores(fn: LogitsFn, windows: Windows, on_window: Callable[[int], Any] | None = None) -> WindowScores:
    out = WindowScores()
    for i, (x, t) in enumerate(zip(windows.inputs, windows.targets)):
        nll, am = score(fn(x), t)
        out.nll.append(nll)
        out.argmax.append(am)
        if on_window is not None:
            on_window(i)
    return out


def perplexity(nll: Sequence[torch.Tensor]) -> float:
    cat = torch.cat([n.flatten() for n in nll])
    return math.exp(float(cat.mean()))


class FloatReference:
    """fp32 NLL and argmax per window, computed once and shared by every comparison."""

    def __init__(self, fn: LogitsFn, windows: Windows) -> None:
        self.fn = fn
        self.windows = windows
        self._scores: WindowScores | None = None
        self.seconds = 0.0

    def scores(self, on_window: Callable[[int], Any] | None = None) -> WindowScores:
        if self._scores is None:
            t0 = time.perf_counter()
            self._scores = run_scores(self.fn, self.windows, on_window)
            self.seconds = time.perf_counter() - t0
        return self._scores

    @property
    def perplexity(self) -> float:
        return perplexity(self.scores().nll)

    def subset(self, tokens: int) -> FloatReference:
        """The first windows covering ``tokens`` text tokens, sharing the scores already computed."""
        w = self.windows
        step = w.context - 1 if w.bos else w.context
        k = max(1, math.ceil(tokens / step))
        if k >= len(w.inputs):
            return self
        sub = FloatReference(self.fn, Windows(w.inputs[:k], w.targets[:k], w.context, k * step, w.total_text_tokens, w.bos))
        if self._scores is not None:
            sub._scores = WindowScores(self._scores.nll[:k], self._scores.argmax[:k])
        return sub


@dataclass
class Comparison:
    perplexity: float
    fp32_perplexity: float
    ppl_change: float  # relative: ppl / ppl_fp32 - 1
    top1_agreement: float
    targets: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare(scores: WindowScores, ref: FloatReference, seconds: float = 0.0) -> Comparison:
    rs = ref.scores()
    agree = sum(int((a == b).sum()) for a, b in zip(scores.argmax, rs.argmax))
    n = sum(int(a.numel()) for a in rs.argmax)
    ppl, p0 = perplexity(scores.nll), perplexity(rs.nll)
    return Comparison(ppl, p0, ppl / p0 - 1.0, agree / n, n, seconds)


def evaluate_fn(fn: LogitsFn, ref: FloatReference, on_window: Callable[[int], Any] | None = None) -> Comparison:
    t0 = time.perf_counter()
    scores = run_scores(fn, ref.windows, on_window)
    return compare(scores, ref, time.perf_counter() - t0)


# --- scheme variants ------------------------------------------------------------------

_OPT = re.compile(r"^(emb|embedding)=(auto|none|8w|4w)$")
_SMOOTH = re.compile(r"^smooth(?:=([0-9.]+))?$")
_PASSES = re.compile(r"^(head|down)-passes=(\d+)$")
_HEAD_EQ = re.compile(r"^head-eq=(\w+)$")
_OFFSETS = re.compile(r"^offsets=(\w+)$")
CALIBRATION_TOKENS = 4096  # the shipped text's last tokens; the default evaluation reads its first 8192
CALIBRATION_TEXT = f"phonekit/data/{EVAL_TEXT}, last {CALIBRATION_TOKENS} tokens"  # as eval results and manifests say it


@dataclass(frozen=True)
class Variant:
    """A scheme plus eval-only research options: ``SCHEME[:OPT,OPT...]`` where OPT is a
    weight method (``asym``, ``affine``, ``sym-search``, ``affine-search``, ``hqq``; default
    ``sym``, the scheme's own min/max meaning), ``emb=auto|none|8w|4w`` (embedding and tied
    head; default ``auto`` as in ``phonekit export``: int8 per row for a tied head of a
    quantized scheme) or ``smooth[=ALPHA]`` (SmoothQuant activation smoothing, quant/smooth.py,
    for the 8da* schemes; calibrated on the shipped text's last 4,096 tokens) or
    ``head-passes=1|2`` (how many int8 passes the tied 8-bit head's input takes; default 2,
    quant.reference.TwoPassInput) or ``head-eq=0|1`` (the tied 8-bit embedding stored
    column-equalized, quant.equalize; default where the head's input is float or in two
    passes) or ``down-passes=1|2`` (int8 passes of down_proj's input; default 2 for 8da8w off
    the .pte, 1 otherwise) or ``offsets=exact|int8`` (how float offsets are stored,
    quant.plan._offsets; default the format's own: exact except on the .pte)."""

    text: str
    scheme: Scheme
    embedding: EmbeddingScheme
    method: str | None = None  # None = the scheme's default weight rounding
    explicit_embedding: bool = False  # emb= given in the options (shown in the label)
    smooth: float | None = None  # SmoothQuant alpha; None = no smoothing
    head_passes: int | None = None  # None = the plan's own (2 for a tied 8-bit head with int8 inputs)
    head_eq: bool | None = None  # None = the plan's own
    down_passes: int | None = None  # None = the plan's own (quant.plan._down_passes)
    offsets: str | None = None  # None = the format's own (quant.plan._offsets)

    @property
    def weight_method(self) -> str | None:
        return None if self.scheme.is_float else (self.method or self.scheme.weight_method)

    @property
    def label(self) -> str:
        parts = [] if self.method is None else [self.method]
        if self.explicit_embedding:
            parts.append(f"emb={self.embedding.name}")
        if self.smooth is not None:
            parts.append(f"smooth={self.smooth:g}")
        if self.head_passes is not None:
            parts.append(f"head-passes={self.head_passes}")
        if self.head_eq is not None:
            parts.append(f"head-eq={int(self.head_eq)}")
        if self.down_passes is not None:
            parts.append(f"down-passes={self.down_passes}")
        if self.offsets is not None:
            parts.append(f"offsets={self.offsets}")
        return self.scheme.name + (":" + ",".join(parts) if parts else "")


def parse_variant(text: str, default_embedding: str | None = "auto") -> Variant:
    base, _, opts = text.strip().partition(":")
    scheme = parse_scheme(base)
    emb = parse_embedding(default_embedding)
    method = None
    explicit = False
    smooth = None
    passes: dict[str, int | None] = {"head": None, "down": None}
    head_eq = None
    offsets = None
    for opt in filter(None, (o.strip().lower() for o in opts.split(","))):
        m = _OPT.match(opt)
        om = _OFFSETS.match(opt)
        sm = _SMOOTH.match(opt)
        pm = _PASSES.match(opt)
        em = _HEAD_EQ.match(opt)
        if m:
            emb = parse_embedding(m.group(2))
            explicit = True
        elif opt in WEIGHT_METHODS:
            method = opt
        elif sm:
            smooth = float(sm.group(1)) if sm.group(1) else DEFAULT_ALPHA
            if not 0.0 < smooth < 1.0:
                raise QuantError(f"--quant {text!r}: smooth={sm.group(1)} must be between 0 and 1, e.g. smooth={DEFAULT_ALPHA}")
        elif pm:
            passes[pm.group(1)] = int(pm.group(2))
            if passes[pm.group(1)] not in (1, 2):
                raise QuantError(f"--quant {text!r}: {opt}; use 1 or 2")
        elif em:
            if em.group(1) not in ("0", "1"):
                raise QuantError(f"--quant {text!r}: head-eq={em.group(1)}; use 0 or 1")
            head_eq = em.group(1) == "1"
        elif om:
            if om.group(1) not in OFFSET_CHOICES:
                raise QuantError(f"--quant {text!r}: offsets={om.group(1)}; use exact or int8")
            offsets = om.group(1)
        else:
            raise QuantError(f"--quant {text!r}: unknown option {opt!r}; use a weight method "
                             f"({', '.join(WEIGHT_METHODS)}), emb=auto|none|8w|4w, smooth[=ALPHA], head-passes=1|2, head-eq=0|1, "
                             "down-passes=1|2 or offsets=exact|int8, "
                             "e.g. 8da4w:affine,emb=8w")
    if method is not None and scheme.is_float:
        raise QuantError(f"--quant {text!r}: {method} rounds quantized weights and {scheme.name} has none; drop :{method}")
    if smooth is not None and not scheme.dynamic_act:
        raise QuantError(f"--quant {text!r}: smoothing eases int8 activation rounding and {scheme.name} has none; "
                         "use it with 8da8w or 8da4w")
    return Variant(text, scheme, emb, method, explicit, smooth, passes["head"], head_eq, passes["down"], offsets)


def calibration_windows(tokenizer: Any, context: int = DEFAULT_CONTEXT) -> list[torch.Tensor]:
    """The shipped text's last ``CALIBRATION_TOKENS`` tokens in windows of ``context``: the
    activation statistics smoothing needs, from text the default evaluation does not score."""
    ids = tokenizer.encode(read_text(None)[0], add_bos=False)[-CALIBRATION_TOKENS:]
    return [torch.tensor(ids[i:i + context], dtype=torch.long) for i in range(0, len(ids), context)]


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy without KV caches (the tied head stays tied in the copy)."""
    saved = model.caches
    model.clear_caches()
    try:
        return copy.deepcopy(model)
    finally:
        model.caches = saved


def plan_for(model: nn.Module, variant: Variant, fmt: str | None = None) -> QuantPlan:
    """The plan ``phonekit export --format fmt`` would apply (``fmt`` None: the format-free
    meaning: exact float offsets, fp32 scales)."""
    scheme = variant.scheme if variant.method is None else replace(variant.scheme, method=variant.method)
    try:
        plan = make_plan(model, scheme, variant.embedding, fmt, variant.head_passes, variant.head_eq, variant.down_passes,
                         variant.offsets)
    except PlanOptionError as e:  # the variant's own plan options: name the variant
        raise PlanOptionError(f"--quant {variant.text!r}: {e}", e.option) from None
    return plan


@torch.no_grad()
def quantized_model(model: nn.Module, variant: Variant, backend: str = "reference",
                    fmt: str | None = None, calibration: list[torch.Tensor] | None = None) -> tuple[nn.Module, QuantPlan]:
    """A quantized copy of ``model`` (``model`` is left as it is). ``backend`` torchao is
    the eager model ExecuTorch lowers, so its plan is the .pte's. A smoothed variant needs
    ``calibration`` windows."""
    check_backend(backend, fmt)
    m = detached_copy(model)
    if variant.smooth is not None:
        if not calibration:
            raise QuantError(f"{variant.label}: smoothing needs calibration windows")
        smooth_model(m, calibration, variant.smooth)
    plan = plan_for(m, variant, "pte" if backend == "torchao" else fmt)
    apply_head_equalization(m, plan)  # before the fp16 rounding below, as an export rounds the equalized weights
    if variant.scheme.base == "fp16":
        # fp16 storage: weights rounded to half, arithmetic kept in fp32 (CPU half matmuls are slow
        # and phones compute fp16 models with fp32 accumulation anyway).
        for p in m.parameters():
            p.data = p.data.half().float()
        if getattr(m, "embed_scale", None) is not None:  # stored with the weights (an fp16 initializer in ONNX)
            m.embed_scale = m.embed_scale.half().float()
    if backend == "reference":
        return fake_quantize_model(m, plan), plan
    from phonekit.quant.torchao_apply import apply_plan

    return apply_plan(m, plan), plan


def check_backend(backend: str, fmt: str | None = None) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torchao" and fmt not in (None, "pte"):
        raise UsageError(f"--backend torchao is the eager model of the .pte; drop --format {fmt} or use --backend reference")


@dataclass
class VariantResult:
    variant: Variant
    backend: str
    comparison: Comparison
    plan: QuantPlan

    def as_dict(self) -> dict[str, Any]:
        v = self.variant
        # The plan's embedding scheme is the resolved one (``auto`` becomes 8w or none per model).
        return {"scheme": v.scheme.name, "variant": v.label, "weights": v.weight_method or "float", "embedding": self.plan.embedding_scheme.name,
                "backend": self.backend, **self.comparison.as_dict(), "plan": self.plan.summary(),
                "head_int8_passes": self.plan.head_int8_passes, "head_equalized": self.plan.head_equalization is not None,
                "two_pass_linears": len(self.plan.two_pass_linears),
                "smoothing": None if v.smooth is None else {"method": "smoothquant", "alpha": v.smooth,
                                                            "calibration_text": CALIBRATION_TEXT}}


def evaluate_variant(model: nn.Module, variant: Variant, ref: FloatReference, backend: str = "reference",
                     on_window: Callable[[int], Any] | None = None, fmt: str | None = None,
                     calibration: list[torch.Tensor] | None = None) -> VariantResult:
    qm, plan = quantized_model(model, variant, backend, fmt, calibration)
    try:
        cmp = evaluate_fn(model_logits_fn(qm), ref, on_window)
    finally:
        del qm
    return VariantResult(variant, backend, cmp, plan)
