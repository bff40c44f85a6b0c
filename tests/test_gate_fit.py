"""The budget gate (export --device), phonekit check and phonekit fit."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import make_tiny_lm, write_hf_checkpoint
from phonekit.errors import OverBudgetError
from phonekit.export.bundle import Artifact, BundleWriter, base_manifest, schema
from phonekit.export.cli import main
from phonekit.export.models import build_model
from phonekit.export.presets import PRESETS
from phonekit.profiles.advisor import fit_table
from phonekit.profiles.devices import resolve_device
from phonekit.profiles.estimate import Estimator, estimate
from phonekit.profiles.gate import check_gate, suggest
from phonekit.quant import make_plan, parse_embedding, parse_scheme


def tiny_plan(lm, scheme: str = "8da4w", fmt: str = "pte", emb: str = "auto"):
    return make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), fmt)


def preset_plan(name: str, scheme: str, fmt: str, emb: str = "auto"):
    args = copy.deepcopy(PRESETS[name].args)
    with torch.device("meta"):
        model = build_model(args)
    return args, make_plan(model, parse_scheme(scheme), parse_embedding(emb), fmt)


def profile(tmp_path: Path, name: str, budget_bytes: int, fraction: float = 0.10) -> Path:
    """A device profile whose budget at ``fraction`` is exactly ``budget_bytes``."""
    f = tmp_path / f"{name}.toml"
    dram_gb = budget_bytes / fraction / 1e9
    f.write_text(f'name = "{name}"\nos = "Android"\nsoc = "test"\ndram_gb = {dram_gb!r}\n[sources]\ndram = "test"\n')
    assert resolve_device(str(f)).budget_bytes(fraction) == budget_bytes
    return f


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_hf_checkpoint(make_tiny_lm("mobilellm"), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_gate_exits_3_and_writes_nothing(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    from phonekit.export import load_model

    lm = load_model(str(tiny_folder))  # the model exactly as export sees it (its tokenizer files too)
    tok = sum(len(b) for b in lm.tokenizer.files.values())
    est = Estimator(lm.config, tiny_plan(lm), "pte", tokenizer_bytes=tok)
    budget = (est.total(16) + est.total(128)) // 2  # a context of 16 fits, 128 does not
    dev = profile(tmp_path, "small-phone", budget)
    out = tmp_path / "bundles" / "tiny"
    rc = main(["export", str(tiny_folder), "--format", "pte", "--quant", "8da4w", "--context", "128",
               "--device", str(dev), "--device", "pixel-8-pro", "--out", str(out), "--quiet"])
    assert rc == 3
    assert not out.exists() and not (tmp_path / "bundles").exists()  # not even the parent folder
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("phonekit export: error: pte artifact needs")
    assert "on small-phone" in err and f"budget {budget / 1e6:,.0f} MB" in err and "nothing was written" in err
    assert "--allow-over-budget" in err
    # The suggested context is the largest that fits: N fits, N + 1 does not.
    n = int(err.split("--context ")[1].split(";")[0].split()[0])
    assert 16 <= n < 128 and est.total(n) <= budget < est.total(n + 1)


def test_gate_verdicts_match_schema_and_allow_over() -> None:
    lm = make_tiny_lm("mobilellm")
    plans = {"pte": tiny_plan(lm), "onnx": tiny_plan(lm, fmt="onnx")}
    budget = check_gate(lm, plans, 64, ["iphone-15", "pixel-8-pro"], 0.10, False)
    jsonschema.validate(budget, schema()["properties"]["budget"])
    assert [(v["device"], v["format"]) for v in budget["verdicts"]] == [
        ("iphone-15", "pte"), ("iphone-15", "onnx"), ("pixel-8-pro", "pte"), ("pixel-8-pro", "onnx")]
    tok = sum(len(b) for b in lm.tokenizer.files.values())
    for v in budget["verdicts"]:
        dram = {"iphone-15": 6 * 10**9, "pixel-8-pro": 12 * 10**9}[v["device"]]
        est = estimate(lm.config, plans[v["format"]], 64, v["format"], tokenizer_bytes=tok).total
        assert (v["dram_bytes"], v["budget_bytes"], v["estimate_bytes"]) == (dram, dram // 10, est)
        assert v["headroom_bytes"] == dram // 10 - est and v["fits"] is True
        assert v["fits_os_limit"] is (True if v["device"] == "iphone-15" else None)
    # Over budget everywhere (1% of DRAM of a 0.1 GB phone), written anyway: the verdict is recorded.
    with pytest.raises(OverBudgetError) as e:
        check_gate(lm, plans, 64, ["iphone-15"], 0.00001, False)
    assert e.value.exit_code == 3 and "iphone-15" in str(e.value)
    rec = check_gate(lm, plans, 64, ["iphone-15"], 0.00001, True)
    assert rec["allow_over_budget"] is True and not any(v["fits"] for v in rec["verdicts"])


def test_gate_suggests_a_stronger_scheme_and_a_smaller_preset() -> None:
    args, fp32 = preset_plan("mobilellm-350m", "fp32", "pte")
    _, q4 = preset_plan("mobilellm-350m", "8da4w", "pte")
    _, q8 = preset_plan("mobilellm-350m", "8da8w", "pte")
    budget = estimate(args, q4, 512, "pte").total + 1
    assert estimate(args, q8, 512, "pte").total > budget  # so 8da8w is not enough, 8da4w is
    fixes = suggest(args, fp32, 512, "pte", budget, None, "mobilellm-350m")
    assert any(f.startswith("--quant 8da4w") for f in fixes), fixes
    # A budget only MobileLLM-125M fits at this scheme and context.
    small_args, small = preset_plan("mobilellm-125m", "8da4w", "pte")
    budget = estimate(small_args, small, 512, "pte").total + 1
    fixes = suggest(args, q4, 512, "pte", budget, None, "mobilellm-350m")
    assert "the smaller preset mobilellm-125m" in fixes
    # A quantized embedding is the next lever once the linears are 4-bit.
    _, q4e = preset_plan("mobilellm-350m", "8da4w", "pte", emb="4w")
    budget = estimate(args, q4e, 512, "pte").total + 1
    assert any(f.startswith("--quant 8da4w --quant-embedding") for f in suggest(args, q4, 512, "pte", budget, None))


def test_check_model_json_and_exit_codes(capsys) -> None:
    args, plan = preset_plan("mobilellm-125m", "8da4w", "pte")
    assert main(["check", "mobilellm-125m", "--format", "pte", "--context", "256", "--device", "pixel-8-pro",
                 "--device", "iphone-15", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = estimate(args, plan, 256, "pte").total
    assert out["estimates"]["pte"]["total_bytes"] == want and out["estimates"]["pte"]["scheme"] == "8da4w-g32"
    assert [(v["device"], v["budget_bytes"], v["estimate_bytes"]) for v in out["verdicts"]] == [
        ("pixel-8-pro", 1_200_000_000, want), ("iphone-15", 600_000_000, want)]
    # Every format by default, counterparts for formats that cannot run the scheme; over budget -> 3.
    assert main(["check", "mobilellm-1.5b", "--context", "2048", "--device", "iphone-15", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert {f: e["scheme"] for f, e in out["estimates"].items()} == {"pte": "8da4w-g32", "onnx": "8da4w-g32", "coreml": "w4-g32"}
    assert not any(v["fits"] for v in out["verdicts"])
    assert main(["check", "mobilellm-125m", "--measure"]) == 2
    assert "--measure needs a bundle" in capsys.readouterr().err
    assert main(["check", "no-such-model"]) == 2
    assert "not a bundle, preset" in capsys.readouterr().err


def test_check_bundle_uses_the_recorded_memory_plan(tmp_path: Path, capsys) -> None:
    lm = make_tiny_lm("mobilellm")
    plan = tiny_plan(lm)
    out = tmp_path / "b"
    planned = 1_234_567
    with BundleWriter(out) as w:
        m = base_manifest(lm, 64, plan.summary(), w.root)
        (w.root / "model.pte").write_bytes(b"\0" * 100)
        art = Artifact("pte", "model.pte", "xnnpack", ["android"], "executorch 1.5.1",
                       details={"memory_planned_bytes": planned, "quantization": plan.summary()})
        m["artifacts"].append(art.to_manifest(w.root))
        w.write_json("manifest.json", m)
    assert main(["check", str(out), "--device", "iphone-15", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    e = res["estimates"]["pte"]
    kv = 64 * 2 * (2 * 2 * 16) * 4  # context 64, 2 layers, K and V of 2 heads x 16, fp32
    assert e["components"]["kv_cache"] == kv and e["components"]["activations"] == planned - kv
    assert "ExecuTorch memory plan" in e["exact"]["kv_cache+activations"]
    tok = sum(f["bytes"] for f in m["tokenizer"]["files"])
    assert e["components"]["tokenizer"] == tok
    assert main(["check", str(out), "--format", "onnx"]) == 2
    assert "has no onnx artifact" in capsys.readouterr().err


def test_fit_every_preset_in_seconds() -> None:
    devices = [resolve_device(d) for d in ("iphone-15", "pixel-8-pro", "pixel-9-pro")]
    for name, p in PRESETS.items():
        t0 = time.process_time()
        table = fit_table(copy.deepcopy(p.args), name, devices, 0.10, ["pte", "onnx", "coreml"],
                          ["fp32", "fp16", "w8", "8da8w", "w4", "8da4w"], "4w")
        assert time.process_time() - t0 < 5, name
        assert len(table.columns) == 3 + 6 + 4  # every scheme each format runs
        for (dev, fmt, scheme), c in table.cells.items():
            d = next(x for x in devices if x.id == dev)
            args, plan = preset_plan(name, scheme, fmt, "4w")
            est = Estimator(args, plan, fmt)
            if c is not None:
                assert est.total(c) <= d.budget_bytes(0.10), (name, dev, fmt, scheme)
                assert c == args.max_context or est.total(c + 1) > d.budget_bytes(0.10)
            else:
                assert est.total(2) > d.budget_bytes(0.10)
            break  # one cell per preset re-derived here; monotonicity below covers the rest
        for fmt, scheme in table.columns:  # more DRAM never fits less
            vals = [table.cells[(d.id, fmt, scheme)] or 0 for d in devices]
            assert vals == sorted(vals)


def test_fit_cli_writes_table_json_and_png(tmp_path: Path, capsys) -> None:
    png = tmp_path / "plm.png"
    assert main(["fit", "plm-1.8b", "--random-weights", "--device", "iphone-15", "--device", "pixel-9-pro",
                 "--quant-embedding", "4w", "--png", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["png"] == str(png)
    assert out["model"] == "plm-1.8b" and out["max_context"] == 4096
    rows = {d["device"]: d["largest_context"] for d in out["devices"]}
    # PLM-1.8B at int4 with a 4-bit embedding is ~1 GB: over an iPhone 15's 600 MB, within a
    # 16 GB Pixel 9 Pro's 1.6 GB on Core ML at some context.
    assert rows["iphone-15"]["coreml/w4-g32"] is None and rows["pixel-9-pro"]["coreml/w4-g32"] is not None
    assert main(["fit", "mobilellm-1.5b", "--no-png", "--format", "onnx", "--quant", "w4"]) == 0
    text = capsys.readouterr().out
    assert "largest context" in text and "w4-g32" in text and "iphone-15" in text
