"""``phonekit run``: verify a bundle's checksums, then stream text through one of its artifacts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phonekit.errors import UsageError
from phonekit.export.commands import verb_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "run", "Run a bundle on this machine: verify sha256s, stream text, print tokens/s.",
                    'phonekit run bundles/smol --format pte --chat --prompt "What is the capital of France?"')
    p.add_argument("bundle", type=Path, help="bundle folder written by phonekit export")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--format", choices=["pte", "onnx", "coreml"], help="which artifact (default: the first)")
    p.add_argument("--json", action="store_true", help="print JSON: token_ids, text, tokens/s")
    p.set_defaults(func=run)


def bundle_tokenizer(bundle: Path, manifest: dict):
    from phonekit.export.tokenizer import load_sentencepiece, Tokenizer

    tk = manifest["tokenizer"]
    names = {f["path"] for f in tk["files"]}
    if "tokenizer.json" in names:
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(str(bundle / "tokenizer.json"))
        bos = tk["bos_id"]
        eos_tok = backend.id_to_token(tk["eos_ids"][0]) if tk["eos_ids"] else None
        bos_tok = backend.id_to_token(bos) if bos is not None else None
        return Tokenizer(backend, "hf", bos, tk["eos_ids"], tk["add_bos"], tk["chat_template"], bos_tok, eos_tok)
    if "tokenizer.model" in names:
        t = load_sentencepiece(bundle / "tokenizer.model", tk["chat_template"])
        t.eos_ids, t.add_bos = tk["eos_ids"], tk["add_bos"]
        return t
    raise UsageError(f"{bundle}: the bundle has no tokenizer (exported from random weights); it cannot run text")


def run(args: argparse.Namespace) -> int:
    from phonekit.export.bundle import read_manifest, verify_files
    from phonekit.export.runtime import greedy, open_session, pick_artifact

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    manifest = read_manifest(args.bundle)
    art = pick_artifact(manifest, args.format)
    verify_files(args.bundle, manifest, [art["format"]])
    tok = bundle_tokenizer(args.bundle, manifest)
    ids = tok.encode_chat(args.prompt) if args.chat else tok.encode(args.prompt)
    session = open_session(args.bundle, manifest, art)
    stats: list = []
    out: list[int] = []
    shown = ""
    for t in greedy(session, ids, args.max_new_tokens, manifest["tokenizer"]["eos_ids"], stats=stats):
        out.append(t)
        if not args.json:
            text = tok.decode(out)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    s = stats[0]
    if args.json:
        print(json.dumps({"format": art["format"], "token_ids": out, "text": tok.decode(out),
                          "prompt_tokens": s.prompt_tokens, "prefill_tokens_per_s": round(s.prefill_tps, 2),
                          "decode_tokens_per_s": round(s.decode_tps, 2)}))
    else:
        print(f"\n[{art['format']}: prefill {s.prompt_tokens} tok at {s.prefill_tps:.1f} tok/s, "
              f"decode {s.new_tokens} tok at {s.decode_tps:.1f} tok/s]", file=sys.stderr)
    return 0
