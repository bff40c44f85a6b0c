"""The bundle contract through the CLI: manifest against the JSON Schema, sha256s,
byte-identical re-export, atomic writes, `phonekit run`, and every bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import make_tiny_lm, write_hf_checkpoint

from phonekit.export.bundle import read_manifest, validate_manifest, verify_files
from phonekit.export.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    lm = make_tiny_lm("mobilellm", seed=4, num_hidden_layers=1)
    return write_hf_checkpoint(lm, tmp_path_factory.mktemp("ckpt") / "tiny-mllm")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert main(["export", str(tiny_folder), "--format", "pte", "--quant", "8da4w", "--context", "32",
                 "--out", str(out), "--quiet"]) == 0
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_is_valid_and_complete(tiny_bundle):
    m = read_manifest(tiny_bundle)  # validates against phonekit/schemas/bundle-1.schema.json
    assert m["schema"] == "phonekit.bundle/1"
    assert m["model"]["family"] == "mobilellm" and m["context_length"] == 32
    assert m["quantization"]["scheme"] == "8da4w-g32"
    assert m["quantization"]["quantized_linears"] == 7  # q k v o gate up down of the single block
    art = m["artifacts"][0]
    assert art["format"] == "pte" and art["backend"] == "xnnpack" and set(art["platforms"]) == {"android", "ios"}
    assert art["bytes"] == (tiny_bundle / "model.pte").stat().st_size
    assert art["sha256"] == hashlib.sha256((tiny_bundle / "model.pte").read_bytes()).hexdigest()
    assert [f["path"] for f in m["tokenizer"]["files"]] == ["tokenizer.json"]
    verify_files(tiny_bundle, m)
    assert not list(tiny_bundle.parent.glob(".bundle.tmp-*"))


def test_schema_rejects_a_broken_manifest(tiny_bundle):
    from phonekit.errors import BundleError

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    del m["artifacts"][0]["sha256"]
    with pytest.raises(BundleError, match="artifacts/0"):
        validate_manifest(m)


def test_same_export_twice_is_byte_identical(tiny_folder, tiny_bundle, tmp_path):
    out = tmp_path / "again"
    assert main(["export", str(tiny_folder), "--format", "pte", "--quant", "8da4w", "--context", "32",
                 "--out", str(out), "--quiet"]) == 0
    assert _digest(out) == _digest(tiny_bundle)


def test_run_streams_text_and_matches_eager(tiny_folder, tiny_bundle, capsys):
    rc = main(["run", str(tiny_bundle), "--prompt", "hello phone", "--max-new-tokens", "12", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["token_ids"]) >= 1 and out["decode_tokens_per_s"] >= 0
    # Same tokens as the eager quant reference.
    import copy

    from phonekit.export import load_model
    from phonekit.quant import make_plan, parse_embedding, parse_scheme
    from phonekit.quant.reference import fake_quantize_model

    lm = load_model(str(tiny_folder))
    plan = make_plan(lm.model, parse_scheme("8da4w"), parse_embedding("auto"), "pte")
    assert plan.embedding is not None and plan.embedding.bits == 8
    lm.model = fake_quantize_model(copy.deepcopy(lm.model), plan)
    assert out["token_ids"] == lm.generate(lm.tokenizer.encode("hello phone"), 12)


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path, capsys):
    import shutil

    copy_ = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy_)
    data = bytearray((copy_ / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy_ / "model.pte").write_bytes(bytes(data))
    rc = main(["run", str(copy_), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "sha256 does not match" in err and "model.pte" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (["--quant", "8da3w"], "unknown scheme"),
    (["--quant", "w4"], "not available for --format pte"),
    (["--quant", "8da4w-g48"], "power of two"),
    (["--quant", "8da4w-g16"], "groups of at least 32; use --quant 8da4w-g32"),
    (["--context", "100000"], "over the model's maximum of 128"),
    (["--context", "1"], "at least 2"),
    (["--format", "coreml", "--quant", "8da4w"], "use --quant w4"),
])
def test_bad_export_inputs(tiny_folder, tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    base = ["export", str(tiny_folder), "--out", str(out), "--quiet"]
    if "--format" not in argv:
        base += ["--format", "pte"]
    rc = main(base + argv)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_existing_out_needs_force(tiny_folder, tiny_bundle, capsys):
    before = _digest(tiny_bundle)
    rc = main(["export", str(tiny_folder), "--format", "pte", "--out", str(tiny_bundle), "--quiet"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert _digest(tiny_bundle) == before


def test_failed_export_leaves_nothing(tiny_folder, tmp_path, monkeypatch, capsys):
    """An exporter that dies half-way: no bundle, no temp folder."""
    from phonekit.errors import ExportError
    from phonekit.export import pte_export

    def boom(*a, **k):
        raise ExportError("simulated failure in lowering")

    monkeypatch.setattr(pte_export, "lower", boom)
    out = tmp_path / "half"
    rc = main(["export", str(tiny_folder), "--format", "pte", "--out", str(out), "--quiet"])
    assert rc == 2 and "simulated failure" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_unknown_format_and_missing_manifest(tiny_bundle, tmp_path, capsys):
    assert main(["run", str(tiny_bundle), "--format", "onnx", "--prompt", "x"]) == 2
    assert "no onnx artifact" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err


def test_every_verb_has_help_with_an_example(capsys):
    from phonekit.export.cli import VERBS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= {"models", "generate", "export", "run"}
    for verb, p in sub.choices.items():
        assert "example:" in p.format_help() and "phonekit " in p.format_help(), verb
    assert set(sub.choices) <= set(VERBS)


def test_coreml_export_twice_is_byte_identical(tiny_folder, tmp_path):
    """coremltools names package items with random uuids and protobuf writes maps in a
    per-process order; phonekit rewrites both so a re-export gives the same bytes."""
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["export", str(tiny_folder), "--format", "coreml", "--quant", "w4", "--context", "32",
                     "--out", str(out), "--quiet"]) == 0
        digests.append(_digest(out))
    assert digests[0] == digests[1]
    assert any(p.endswith("model.mlmodel") for p in digests[0])
