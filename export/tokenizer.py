"""Tokenizers: HF ``tokenizer.json``, SentencePiece ``tokenizer.model`` and the
tokenizer inside a GGUF file, behind one small interface."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phonekit.errors import TokenizerError


@dataclass
class Tokenizer:
    """``encode(str) -> list[int]`` (BOS prepended when the model wants it), ``decode(list[int]) -> str``."""

    backend: Any
    kind: str  # "hf" | "sentencepiece"
    bos_id: int | None
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    # Files that reproduce this tokenizer in a bundle: name -> bytes.
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        add_bos = self.add_bos if add_bos is None else add_bos
        if self.kind == "sentencepiece":
            ids = list(self.backend.encode(text))
        else:
            ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            if skip_special:
                ids = [i for i in ids if not self.backend.is_control(i)]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's chat template; without one, join the user turns (base LMs)."""
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages)
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template: cannot render it ({e}); run without --chat") from None

    def encode_chat(self, prompt: str) -> list[int]:
        text = self.apply_chat([{"role": "user", "content": prompt}])
        # Templates that write BOS themselves must not get a second one.
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_bos=self.add_bos and not starts_with_bos)

    def ids(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "add_bos": self.add_bos, "vocab_size": self.vocab_size}


def _raise(msg: str) -> None:
    raise TokenizerError(f"chat template: {msg}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e}); fix or remove the file") from None


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v or None


def load_tokenizer_dir(folder: Path, model_bos: int | None, model_eos: list[int]) -> Tokenizer:
    """A tokenizer from a HF folder: ``tokenizer.json`` first, then SentencePiece ``tokenizer.model``."""
    folder = Path(folder)
    cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    bos_tok, eos_tok = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    tj = folder / "tokenizer.json"
    sp = folder / "tokenizer.model"
    if tj.exists():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a plain Exception on bad files
            raise TokenizerError(f"{tj}: not a valid tokenizer.json ({e})") from None
        bos_id = backend.token_to_id(bos_tok) if bos_tok else model_bos
        eos_ids = list(model_eos)
        if eos_tok and backend.token_to_id(eos_tok) is not None and backend.token_to_id(eos_tok) not in eos_ids:
            eos_ids.append(backend.token_to_id(eos_tok))
        add_bos = bool(cfg.get("add_bos_token", False))
        files = {"tokenizer.json": tj.read_bytes()}
        return Tokenizer(backend, "hf", bos_id, eos_ids, add_bos, template, bos_tok, eos_tok, files)
    if sp.exists():
        return load_sentencepiece(sp, template, cfg)
    raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model; copy the checkpoint's tokenizer files into the folder")


def load_sentencepiece(path: Path, template: str | None = None, cfg: dict[str, Any] | None = None) -> Tokenizer:
    """MobileLLM's LLaMA-2 SentencePiece model. Its tokenizer_config.json has empty
    special-token strings, so the ids are fixed: <unk>=0, <s>=1 (prepended), </s>=2."""
    import sentencepiece as spm

    try:
        backend = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError variants
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from None
    bos = backend.bos_id() if backend.bos_id() >= 0 else 1
    eos = backend.eos_id() if backend.eos_id() >= 0 else 2
    add_bos = True if cfg is None else bool(cfg.get("add_bos_token", True))
    return Tokenizer(backend, "sentencepiece", bos, [eos], add_bos, template, "<s>", "</s>", {"tokenizer.model": path.read_bytes()})


# Pre-tokenizer regexes of the BPE families phonekit's models use (``tokenizer.ggml.pre``).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_from_gguf(tokens: list[str], merges: list[str], pre: str | None) -> Any:
    """A HF ``tokenizers`` byte-level BPE from GGUF ``tokens``/``merges``.

    ``smollm`` splits digits before GPT-2's byte-level regex; ``qwen2`` (PLM) uses its
    own split regex and NFC normalization; anything else gets GPT-2's regex.
    """
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer_gguf(path: Path, reader: Any) -> Tokenizer:
    """The tokenizer stored in a GGUF file, as a HF ``tokenizer.json``.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, PLM/Qwen2) is built
    here from the tokens and merges; other kinds (SentencePiece ``llama``) go through
    transformers' GGUF converter.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    model = field("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{path}: the GGUF file carries no tokenizer; pass a HF folder with tokenizer.json instead")
    if model == "gpt2":
        tokens = field("tokenizer.ggml.tokens") or []
        types = field("tokenizer.ggml.token_type") or []
        backend = _bpe_from_gguf(tokens, field("tokenizer.ggml.merges") or [], field("tokenizer.ggml.pre"))
        # Control tokens (type 3) are special: never split, skipped when decoding.
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        backend.add_special_tokens(specials)
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            backend = HFTokenizer.from_str(tok.backend_tokenizer.to_str())
        except Exception as e:  # transformers wraps many parse failures
            raise TokenizerError(f"{path}: cannot convert its {model!r} tokenizer ({e})") from None
    bos = field("tokenizer.ggml.bos_token_id")
    eos = field("tokenizer.ggml.eos_token_id")
    add_bos = bool(field("tokenizer.ggml.add_bos_token") or False)
    template = field("tokenizer.chat_template")
    bos_tok = backend.id_to_token(int(bos)) if bos is not None else None
    eos_tok = backend.id_to_token(int(eos)) if eos is not None else None
    eos_ids = [int(eos)] if eos is not None else []
    files = {"tokenizer.json": backend.to_str().encode("utf-8")}
    return Tokenizer(backend, "hf", None if bos is None else int(bos), eos_ids, add_bos, template, bos_tok, eos_tok, files)
