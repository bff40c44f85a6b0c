"""The bundle's model card: rendered from manifest.json alone, parsed back here and
compared number by number with the manifest it came from."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import make_tiny_lm
from phonekit.errors import BundleError
from phonekit.export.bundle import Artifact, base_manifest, validate_manifest
from phonekit.export.model_card import human_bytes, render_card
from phonekit.quant import make_plan, parse_embedding, parse_scheme


# -- parsing the card back ------------------------------------------------------------------------

def split_card(card: str) -> tuple[dict[str, Any], str]:
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.S)
    assert m, "the card must start with YAML front matter"
    return yaml.safe_load(m.group(1)), m.group(2)


def sections(body: str) -> dict[str, str]:
    """``## heading`` -> its text (up to the next ``## ``)."""
    out: dict[str, str] = {}
    for block in re.split(r"^## ", body, flags=re.M)[1:]:
        head, _, rest = block.partition("\n")
        out[head.strip()] = rest
    return out


def table(text: str) -> list[dict[str, str]]:
    """The first Markdown table in ``text`` as rows of header -> cell (backticks stripped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(lines) >= 2, f"no table in:\n{text}"
    cells = [[c.strip().strip("`") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, r, strict=True)) for r in rows]


def code_lines(text: str) -> list[str]:
    out, inside = [], False
    for ln in text.splitlines():
        if ln.startswith("```"):
            inside = not inside
            continue
        code = ln.split("#")[0].strip()  # a shell comment is not a command
        if inside and code:
            out.append(code)
    return out


UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def shows(cell: str, n: int) -> bool:
    """Does a '123.5 kB' / '-100.1 MB' cell show the byte count ``n`` at the card's precision?"""
    num, unit = cell.split()
    return float(num) == round(n / UNITS[unit], 1) and (unit == "B" or 1 <= abs(round(n / UNITS[unit], 1)) < 1000)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (949, "949 B"), (999, "1.0 kB"), (949_949, "949.9 kB"),
                                     (999_950, "1.0 MB"), (1_234_567, "1.2 MB"), (8_000_000_000, "8.0 GB")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text and shows(text, n)


# -- manifests to render --------------------------------------------------------------------------

def make_manifest(tmp_path: Path, *, scheme: str = "8da4w-g32", emb: str = "8w", tokenizer: bool = True,
                  hub_id: str | None = "HuggingFaceTB/SmolLM2-135M-Instruct", license: str | None = "apache-2.0",
                  budget: bool = True, eval_: bool = True) -> dict[str, Any]:
    """A schema-valid manifest of a tiny model with three artifacts of all shapes: one file
    (pte), a file plus external data (onnx) and a folder (coreml)."""
    lm = make_tiny_lm("mobilellm")
    lm.hub_id, lm.license = hub_id, license
    if not tokenizer:
        lm.tokenizer = None
    plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), "pte")
    root = tmp_path / "bundle"
    root.mkdir(parents=True)
    m = base_manifest(lm, 64, plan.summary(), root)
    (root / "model.pte").write_bytes(b"p" * 1_234_567)
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"o" * 4321)
    (root / "onnx" / "model.onnx.data").write_bytes(b"d" * 2_500_000)
    pkg = root / "model.mlpackage" / "Data"
    pkg.mkdir(parents=True)
    (pkg / "model.mil").write_bytes(b"m" * 999)
    (pkg / "weight.bin").write_bytes(b"w" * 987_654)
    arts = [
        Artifact("pte", "model.pte", "xnnpack", ["android", "ios"], "executorch 1.5.1",
                 details={"quantization": plan.summary()}),
        Artifact("onnx", "onnx/model.onnx", "onnxruntime-cpu", ["android", "linux"], "onnxruntime 1.32.0",
                 extra_files=["onnx/model.onnx.data"], details={"quantization": {**plan.summary(), "scheme": "w4-g32"}}),
        Artifact("coreml", "model.mlpackage", "coreml", ["ios", "macos"], "coremltools 9.0"),
    ]
    m["artifacts"] = [a.to_manifest(root) for a in arts]
    if budget:
        m["budget"] = {"budget_fraction": 0.1, "allow_over_budget": True, "verdicts": [
            {"device": "pixel-8", "format": "pte", "dram_bytes": 8_000_000_000, "budget_bytes": 800_000_000,
             "estimate_bytes": 123_456_789, "headroom_bytes": 676_543_211, "fits": True, "fits_os_limit": True},
            {"device": "iphone-se-2", "format": "coreml", "dram_bytes": 3_000_000_000, "budget_bytes": 300_000_000,
             "estimate_bytes": 345_678_901, "headroom_bytes": -45_678_901, "fits": False, "fits_os_limit": None},
        ]}
    if eval_:
        m["eval"] = {
            "model": "tiny-mobilellm", "backend": "reference",
            "text": {"path": "/x/phonekit/data/eval_text.txt", "sha256": "0" * 64, "tokens_in_text": 254723, "tokens_used": 8192},
            "context": 512, "windows": 17, "bos_per_window": True, "targets": 8192, "fp32": {"perplexity": 13.5201, "seconds": 3.0},
            "results": [
                {"scheme": "8da8w", "variant": "8da8w", "weights": "sym", "embedding": "none", "backend": "reference",
                 "perplexity": 13.5612, "fp32_perplexity": 13.5201, "ppl_change": 0.00304, "top1_agreement": 0.98731,
                 "targets": 8192, "seconds": 4.2},
                {"scheme": "8da4w-g32", "variant": "8da4w-g32:hqq,emb=8w", "weights": "hqq", "embedding": "8w",
                 "backend": "reference", "perplexity": 14.9876, "fp32_perplexity": 13.5201, "ppl_change": 0.108545,
                 "top1_agreement": 0.874, "targets": 8192, "seconds": 4.4},
            ],
            "sensitivity": None,
        }
    validate_manifest(m)
    return m


# -- tests ----------------------------------------------------------------------------------------

def test_front_matter_is_hub_metadata_from_the_manifest(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    meta, _ = split_card(render_card(m))
    assert meta["library_name"] == "phonekit"
    assert meta["base_model"] == m["model"]["hub_id"]
    assert meta["base_model_relation"] == "quantized"
    assert meta["license"] == m["model"]["license"]
    assert meta["pipeline_tag"] == "text-generation"
    tags = meta["tags"]
    assert {"phonekit", "executorch", "onnx", "coreml", "xnnpack", "android", "ios", "mobilellm", "quantized",
            m["quantization"]["scheme"]} <= set(tags)
    assert len(tags) == len(set(tags))


def test_front_matter_follows_what_is_known(tmp_path: Path) -> None:
    """No hub id -> no base_model; no license -> no license key; one format -> only its tag; fp32 -> not 'quantized'."""
    m = make_manifest(tmp_path, scheme="fp32", emb="none", hub_id=None, license=None)
    m["artifacts"] = m["artifacts"][:1]
    meta, body = split_card(render_card(m))
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta
    assert "executorch" in meta["tags"] and "onnx" not in meta["tags"] and "coreml" not in meta["tags"]
    assert "quantized" not in meta["tags"]
    assert f"An on-device bundle of `{m['model']['id']}` written" in body and "huggingface.co" not in body


def test_bundle_contents_equal_the_manifest(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    _, body = split_card(render_card(m))
    sec = sections(body)

    kv = {row["Field"]: row["Value"] for row in table(sec["What this bundle holds"])}
    assert int(kv["Parameters"].replace(",", "")) == m["model"]["params"]
    assert int(kv["Block applications"]) == m["model"]["block_applications"]
    assert re.match(r"(\d+) tokens", kv["Context length"]).group(1) == str(m["context_length"])
    assert f"allows {m['model']['max_context']}" in kv["Context length"]
    assert kv["Quantization scheme"] == m["quantization"]["scheme"]
    assert kv["Weights"] == m["quantization"]["weights"]
    assert kv["Activations"] == m["quantization"]["activations"]
    assert kv["Embedding"] == f"int{m['quantization']['embedding']['bits']} per row"
    assert f"vocabulary {m['tokenizer']['vocab_size']}" in kv["Tokenizer"]

    rows = table(sec["Artifacts"])
    assert [r["Format"] for r in rows] == [a["format"] for a in m["artifacts"]]
    for r, a in zip(rows, m["artifacts"], strict=True):
        assert r["File"] == a["file"] and r["Backend"] == a["backend"] and r["Runtime"] == a["runtime"]
        assert r["Platforms"].split(", ") == a["platforms"]
        assert int(r["Bytes"]) == a["bytes"]
        assert shows(r["Size"], a["bytes"])
        assert r["sha256"] == a["sha256"]
    # Per-artifact scheme: the onnx artifact recorded a different one than the bundle's.
    assert [r["Scheme"] for r in rows] == ["8da4w-g32", "w4-g32", "-"]

    files = {r["Path"]: (int(r["Bytes"]), r["sha256"]) for r in table(sec["Files"])}
    expected = {f["path"]: (f["bytes"], f["sha256"]) for f in m["tokenizer"]["files"]}
    for a in m["artifacts"]:
        expected.update({f["path"]: (f["bytes"], f["sha256"]) for f in a["files"]})
    assert files == expected
    assert len(files) == 1 + 1 + 2 + 2  # tokenizer, pte, onnx + data, mlpackage's two files


def check_accuracy_section(card: str, ev: dict[str, Any]) -> None:
    """Every number of the card's accuracy table equals the manifest's eval at the card's precision."""
    text = sections(split_card(card)[1])["Quantization accuracy"]
    assert f"{ev['text']['tokens_used']} tokens of `{Path(ev['text']['path']).name}`" in text
    assert f"windows of {ev['context']} tokens" in text and f"backend `{ev['backend']}`" in text
    assert f"fp32 perplexity {ev['fp32']['perplexity']:.3f}" in text
    rows = table(text)
    assert len(rows) == len(ev["results"])
    for r, e in zip(rows, ev["results"], strict=True):
        assert r["Scheme"] == e["variant"] and r["Embedding"] == e["embedding"]
        assert float(r["Perplexity"]) == round(e["perplexity"], 3)
        assert float(r["fp32 perplexity"]) == round(e["fp32_perplexity"], 3)
        assert r["Change"][0] in "+-" and float(r["Change"].rstrip(" %")) == round(e["ppl_change"] * 100, 2)
        assert float(r["Top-1 agreement"].rstrip(" %")) == round(e["top1_agreement"] * 100, 2)


def test_accuracy_table_equals_eval(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    check_accuracy_section(render_card(m), m["eval"])


def test_accuracy_from_a_real_phonekit_eval_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest's eval is what `phonekit eval --json` prints: render that, numbers intact."""
    import json

    from conftest import write_hf_checkpoint
    from phonekit.export.cli import main

    folder = write_hf_checkpoint(make_tiny_lm("mobilellm", num_hidden_layers=1), tmp_path / "tiny")
    assert main(["eval", str(folder), "--quant", "8da4w", "8da8w", "--context", "32", "--max-tokens", "64",
                 "--json", "--quiet"]) == 0
    ev = json.loads(capsys.readouterr().out)
    for r in ev["results"]:
        r.pop("plan", None)  # the documented trim
    m = make_manifest(tmp_path / "m", eval_=False)
    m["eval"] = ev
    validate_manifest(m)
    check_accuracy_section(render_card(m), ev)


def test_accuracy_optional_fields_and_absent_eval(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    m["eval"] = {"results": [{"scheme": "8da4w", "perplexity": 20.0}]}
    validate_manifest(m)
    text = sections(split_card(render_card(m))[1])["Quantization accuracy"]
    assert table(text) == [{"Scheme": "8da4w", "Embedding": "-", "Perplexity": "20.000", "fp32 perplexity": "-",
                            "Change": "-", "Top-1 agreement": "-"}]
    assert text.startswith("\nMeasured by phonekit eval. Change")
    m["eval"] = None
    text = sections(split_card(render_card(m))[1])["Quantization accuracy"]
    assert "|" not in text and "Not measured" in text
    assert f"phonekit eval {m['model']['id']} --quant {m['quantization']['scheme']}" in text


@pytest.mark.parametrize("bad, field", [
    ({"results": "x"}, "field eval:"),
    ([1, 2], "field eval:"),
    ({"rows": []}, "field eval:"),
    ({"results": [{"perplexity": 3.0}]}, "eval/results/0:"),
    ({"results": [{"scheme": "8da4w", "perplexity": float("nan")}]}, "eval/results/0:"),
    ({"results": [{"scheme": "8da4w", "perplexity": 3.0},
                  {"scheme": "w8", "perplexity": 3.0, "top1_agreement": "high"}]}, "eval/results/1/top1_agreement:"),
])
def test_malformed_eval_is_one_clear_error(tmp_path: Path, bad: Any, field: str) -> None:
    m = make_manifest(tmp_path, eval_=False)
    m["eval"] = bad
    with pytest.raises(BundleError) as e:
        render_card(m)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_missing_manifest_field_is_a_bundle_error(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    del m["artifacts"]
    with pytest.raises(BundleError, match="artifacts"):
        render_card(m)


def test_budget_table_equals_verdicts(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    text = sections(split_card(render_card(m))[1])["Memory budget"]
    assert "10 %" in text
    rows = table(text)
    verdicts = m["budget"]["verdicts"]
    assert len(rows) == len(verdicts)
    for r, v in zip(rows, verdicts, strict=True):
        assert r["Device"] == v["device"] and r["Format"] == v["format"]
        for col, key in (("Memory", "dram_bytes"), ("Budget", "budget_bytes"), ("Estimate", "estimate_bytes"),
                         ("Headroom", "headroom_bytes")):
            assert shows(r[col], v[key]), (col, r[col], v[key])
        assert r["Fits"] == ("yes" if v["fits"] else "**no**")
        assert r["Within OS app limit"] == {True: "yes", False: "**no**", None: "-"}[v["fits_os_limit"]]
    assert "Over budget on iphone-se-2: exported anyway with `--allow-over-budget`." in text

    m["budget"] = None
    text = sections(split_card(render_card(m))[1])["Memory budget"]
    assert "|" not in text and "phonekit check . --device" in text


def shown_commands(card: str) -> list[str]:
    body = split_card(card)[1]
    return [ln for text in sections(body).values()
            for ln in code_lines(text) + re.findall(r"`(phonekit [^`]+)`", text) if ln.startswith("phonekit ")]


def test_run_commands_name_each_artifact(tmp_path: Path) -> None:
    from phonekit.export.cli import build_parser

    m = make_manifest(tmp_path)
    run = sections(split_card(render_card(m))[1])["Run it"]
    lines = [ln for ln in code_lines(run) if ln.startswith("phonekit run")]
    parser = build_parser()
    runs = [parser.parse_args(shlex.split(ln)[1:]) for ln in lines]
    assert [a.format for a in runs] == [a["format"] for a in m["artifacts"]]
    assert all(str(a.bundle) == "." and a.chat is False and a.prompt for a in runs)  # tiny tokenizer: no chat template
    assert "### Android" in run and "### iOS" in run


@pytest.mark.parametrize("measured", [True, False])
def test_every_command_shown_is_accepted_by_phonekit(tmp_path: Path, measured: bool) -> None:
    """A card may only tell users to type commands this phonekit has: each `phonekit ...`
    line parses with the real CLI parser (budget/eval absent: the card suggests check/eval)."""
    from phonekit.export.cli import build_parser

    m = make_manifest(tmp_path, budget=measured, eval_=measured)
    shown = shown_commands(render_card(m))
    verbs = {shlex.split(ln)[1] for ln in shown}
    assert verbs == ({"run", "push"} if measured else {"run", "push", "check", "devices", "eval"})
    parser = build_parser()
    for ln in shown:
        try:
            args = parser.parse_args(shlex.split(ln)[1:])
        except SystemExit:
            pytest.fail(f"the card shows a command phonekit rejects: {ln}")
        assert args.verb == shlex.split(ln)[1]


def test_run_section_follows_platforms_and_tokenizer(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    m["artifacts"] = [a for a in m["artifacts"] if a["format"] == "onnx"]  # android + linux only
    m["tokenizer"]["chat_template"] = "{{ messages }}"
    run = sections(split_card(render_card(m))[1])["Run it"]
    assert "### Android" in run and "### iOS" not in run
    assert 'phonekit run . --format onnx --chat --prompt "What is the capital of France?"' in code_lines(run)

    m2 = make_manifest(tmp_path / "nt", tokenizer=False)
    run = sections(split_card(render_card(m2))[1])["Run it"]
    assert "no tokenizer" in run and "phonekit run" not in run
    kv = table(sections(split_card(render_card(m2))[1])["What this bundle holds"])
    assert any("none (random weights" in r["Value"] for r in kv)


def test_card_is_a_pure_function_of_the_manifest(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    before = copy.deepcopy(m)
    card = render_card(m)
    assert m == before  # rendering does not touch the manifest
    assert render_card(copy.deepcopy(m)) == card
    m["artifacts"][0]["bytes"] += 1
    assert render_card(m) != card


def test_pipes_in_manifest_text_do_not_break_tables(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    m["quantization"]["activations"] = "int8 | per token"
    kv = table(sections(split_card(render_card(m))[1])["What this bundle holds"])
    row = next(r for r in kv if r["Field"] == "Activations")
    assert row["Value"] == r"int8 \| per token"


def test_app_sections_name_the_artifacts_each_app_loads(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    run = sections(split_card(render_card(m))[1])["Run it"]
    android, ios = run.split("### iOS")
    # Android's app: ExecuTorch + ONNX; iOS's app: Core ML + ExecuTorch (exporters.TARGETS).
    assert "`model.pte` (ExecuTorch), `onnx/model.onnx` (ONNX)" in android and "mlpackage" not in android
    assert "`model.pte` (ExecuTorch), `model.mlpackage` (Core ML)" in ios and "onnx" not in ios
    assert "phonekit push android ." in code_lines(android)
    assert {"phonekit push ios . --device IDENTIFIER", "phonekit push ios . --manual"} <= set(code_lines(ios))

    onnx = next(a for a in m["artifacts"] if a["format"] == "onnx")
    onnx["details"]["onnxruntime_genai"] = {"compatible": False}
    run = sections(split_card(render_card(m))[1])["Run it"]
    assert "`onnx/model.onnx` is not in the form onnxruntime-genai reads" in run

    m["artifacts"] = [onnx]
    onnx["platforms"] = ["linux"]
    run = sections(split_card(render_card(m))[1])["Run it"]
    assert "### Android" not in run and "### iOS" not in run
    assert "its artifacts are for linux" in run
    assert code_lines(run) == ['phonekit run . --format onnx --prompt "What is the capital of France?"']


def test_app_instructions_match_the_sample_apps() -> None:
    """The folders, project name and READMEs the card points to exist in this repository."""
    from phonekit.export import model_card

    repo = Path(__file__).resolve().parents[1]
    android, ios = repo / model_card.ANDROID_APP_DIR, repo / model_card.IOS_APP_DIR
    assert (android / "settings.gradle.kts").is_file() and (android / "app" / "build.gradle.kts").is_file()
    assert (android / "gradle" / "wrapper" / "gradle-wrapper.properties").is_file()  # what `gradle wrapper` keeps
    project = yaml.safe_load((ios / "project.yml").read_text())
    assert project["name"] == model_card.IOS_PROJECT
    assert (android / "README.md").is_file() and (ios / "README.md").is_file()


def test_two_pass_inputs_row_follows_the_artifacts(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    kv = {row["Field"]: row["Value"] for row in table(sections(split_card(render_card(m))[1])["What this bundle holds"])}
    assert "Two-pass int8 inputs" not in kv  # the .pte plan keeps one pass
    m["artifacts"][1]["details"]["quantization"]["two_pass_linears"] = {"down_proj": 2}
    kv = {row["Field"]: row["Value"] for row in table(sections(split_card(render_card(m))[1])["What this bundle holds"])}
    assert kv["Two-pass int8 inputs"].startswith("onnx: `down_proj` (2) (the input and its int8 rounding residual")


def test_group_offsets_row_says_how_each_artifact_stores_them(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)  # 8da4w: affine-search offsets, int8 on the .pte
    m["artifacts"][1]["details"]["quantization"]["offsets"] = "exact"
    kv = {row["Field"]: row["Value"] for row in table(sections(split_card(render_card(m))[1])["What this bundle holds"])}
    assert kv["Group offsets"] == ("pte: rounded to int8 (one byte a group of 32, a scale per row and block); "
                                   "onnx: exact (float, as fitted)")
    for art in m["artifacts"][:2]:
        art["details"]["quantization"].pop("offsets")
    kv = {row["Field"]: row["Value"] for row in table(sections(split_card(render_card(m))[1])["What this bundle holds"])}
    assert "Group offsets" not in kv
