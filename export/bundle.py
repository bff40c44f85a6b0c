"""The bundle: one folder per export, ``manifest.json`` + tokenizer + artifacts.

The manifest (``"schema": "phonekit.bundle/1"``, JSON Schema in
``phonekit/schemas/bundle-1.schema.json``) is the contract with the apps. Writing
is atomic: everything goes into a temporary sibling folder that is renamed into
place only when the whole export succeeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from phonekit import __version__
from phonekit.errors import BundleError, UsageError

SCHEMA_ID = "phonekit.bundle/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(root: Path, rel: str) -> list[dict[str, Any]]:
    """``[{path, bytes, sha256}]`` for a file, or every file under a folder (sorted)."""
    p = root / rel
    paths = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return [{"path": q.relative_to(root).as_posix(), "bytes": q.stat().st_size, "sha256": sha256_file(q)} for q in paths]


@dataclass
class Artifact:
    """One runnable model file (or folder, e.g. ``model.mlpackage``) in the bundle."""

    format: str  # "pte" | "onnx" | "coreml"
    file: str  # entry point, relative to the bundle
    backend: str  # "xnnpack" | "onnxruntime-cpu" | "coreml"
    platforms: list[str]  # "android", "ios", "macos", "linux"
    runtime: str  # e.g. "executorch 1.5.1"
    extra_files: list[str] = field(default_factory=list)  # side files that belong to it (external data, genai config)
    details: dict[str, Any] = field(default_factory=dict)  # format-specific facts (io names, delegation, ...)

    def to_manifest(self, root: Path) -> dict[str, Any]:
        files = file_entries(root, self.file)
        for extra in self.extra_files:
            files += file_entries(root, extra)
        return {
            "format": self.format,
            "file": self.file,
            "backend": self.backend,
            "platforms": list(self.platforms),
            "runtime": self.runtime,
            "bytes": sum(f["bytes"] for f in files),
            "sha256": files[0]["sha256"] if len(files) == 1 else hashlib.sha256(
                "".join(f"{f['path']}\0{f['sha256']}\n" for f in files).encode()).hexdigest(),
            "files": files,
            "details": self.details,
        }


class BundleWriter:
    """``with BundleWriter(out, force) as w: ... w.root ...``: a temp folder renamed on success."""

    def __init__(self, out: Path, force: bool = False) -> None:
        self.out = Path(out).absolute()
        self.force = force
        self.root: Path | None = None
        if self.out.exists() and not force:
            raise UsageError(f"--out {out}: already exists; choose a new folder or pass --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a folder")
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create its parent folder ({e.strerror})") from None
        if not os.access(parent, os.W_OK):
            raise UsageError(f"--out {out}: the folder {parent} is not writable; choose another --out")

    def __enter__(self) -> "BundleWriter":
        try:
            self.root = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
            self.root.chmod(0o755)  # mkdtemp makes 0700; a bundle is meant to be shared
        except OSError as e:
            raise UsageError(f"--out {self.out}: cannot write there ({e.strerror}); choose another --out") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        assert self.root is not None
        if exc_type is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        trash = None
        if self.out.exists():
            trash = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, trash)
        os.replace(self.root, self.out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def write_json(self, rel: str, data: Any) -> None:
        assert self.root is not None
        (self.root / rel).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def schema() -> dict[str, Any]:
    return json.loads(resources.files("phonekit").joinpath("schemas/bundle-1.schema.json").read_text(encoding="utf-8"))


def validate_manifest(manifest: dict[str, Any], source: str = MANIFEST) -> None:
    import jsonschema

    try:
        jsonschema.validate(manifest, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise BundleError(f"{source}: field {where}: {e.message}; re-export the bundle with this phonekit version") from None


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / MANIFEST
    if not path.exists():
        raise BundleError(f"{path}: not found; pass a folder written by phonekit export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_ID:
        raise BundleError(f"{path}: field schema is not {SCHEMA_ID!r}; re-export the bundle with this phonekit version")
    validate_manifest(manifest, str(path))
    return manifest


def verify_files(bundle: Path, manifest: dict[str, Any], formats: list[str] | None = None) -> None:
    """Check every listed file's size and sha256 (the tokenizer's too)."""
    bundle = Path(bundle)
    entries = list(manifest["tokenizer"]["files"])
    for art in manifest["artifacts"]:
        if formats is None or art["format"] in formats:
            entries += art["files"]
    for f in entries:
        p = bundle / f["path"]
        if not p.is_file():
            raise BundleError(f"{p}: listed in manifest.json but missing; the bundle is incomplete, re-export it")
        if p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            raise BundleError(f"{p}: sha256 does not match manifest.json; the file was modified or corrupted, re-export the bundle")


def base_manifest(lm: Any, context: int, quant_summary: dict[str, Any], root: Path) -> dict[str, Any]:
    """Everything but artifacts and budget; writes the tokenizer files into ``root``."""
    tok = lm.tokenizer
    tok_files: list[dict[str, Any]] = []
    if tok is not None:
        for name, data in sorted(tok.files.items()):
            (root / name).write_bytes(data)
            tok_files += file_entries(root, name)
    cfg = lm.config
    return {
        "schema": SCHEMA_ID,
        "phonekit_version": __version__,
        "model": {
            "id": lm.model_id,
            "family": cfg.family,
            "params": lm.num_params(),
            "hub_id": lm.hub_id,
            "license": lm.license,
            "source": lm.source,
            "layer_sharing": bool(cfg.layer_sharing),
            "block_applications": cfg.block_applications,
            "max_context": cfg.max_context,
            "config": cfg.to_hf_config(),
        },
        "context_length": context,
        "quantization": quant_summary,
        "tokenizer": {
            "files": tok_files,
            "kind": None if tok is None else tok.kind,
            "bos_id": None if tok is None else tok.bos_id,
            "eos_ids": list(cfg.eos_token_id),
            "add_bos": False if tok is None else tok.add_bos,
            "chat_template": None if tok is None else tok.chat_template,
            "vocab_size": cfg.vocab_size,
        },
        "artifacts": [],
        "budget": None,
    }
