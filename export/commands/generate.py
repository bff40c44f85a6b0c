"""``phonekit generate``: greedy text from the eager model through its KV cache."""

from __future__ import annotations

import argparse
import json
import sys
import time

from phonekit.errors import UsageError
from phonekit.export.commands import verb_parser


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name, Hugging Face folder, .gguf file or hub id")
    p.add_argument("--random-weights", action="store_true", help="build a preset with random weights (no download)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "generate", "Generate text greedily with the eager PyTorch model.",
                    'phonekit generate smollm2-135m-instruct --prompt "What is the capital of France?" --chat')
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print JSON with token_ids and text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phonekit.export import load_model

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    lm = load_model(args.model, random_weights=args.random_weights)
    if lm.tokenizer is None:
        raise UsageError(f"{args.model}: no tokenizer with --random-weights; generate needs real weights and a tokenizer")
    ids = lm.tokenizer.encode_chat(args.prompt) if args.chat else lm.tokenizer.encode(args.prompt)
    if len(ids) >= lm.config.max_context:
        raise UsageError(f"--prompt: {len(ids)} tokens, over the model's context of {lm.config.max_context}")
    t0 = time.perf_counter()
    if args.json:
        out = lm.generate(ids, args.max_new_tokens)
        text = lm.tokenizer.decode(out)
        print(json.dumps({"model": lm.model_id, "prompt_ids": ids, "token_ids": out, "text": text,
                          "seconds": round(time.perf_counter() - t0, 3)}))
        return 0
    out: list[int] = []
    shown = ""
    for tok in lm.stream(ids, args.max_new_tokens):
        out.append(tok)
        text = lm.tokenizer.decode(out)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    dt = time.perf_counter() - t0
    print(f"\n[{len(out)} tokens, {len(out) / dt:.1f} tok/s]", file=sys.stderr)
    return 0
