"""``optimum-cli export phonekit``: discovered by optimum through the
``optimum.commands.register`` namespace, documented by --help, and the same export
as ``phonekit export``: same bundle bytes, same error messages, same exit codes."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_lm, write_hf_checkpoint
from phonekit.export.cli import build_parser
from phonekit.export.cli import main as phonekit_main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPTIMUM_CLI = BIN / "optimum-cli"
PK_PREFIX = "phonekit export: error: "
OPT_PREFIX = "optimum-cli export phonekit: error: "


def plugin():  # noqa: ANN201 - the module optimum discovers
    import optimum.commands.register.register_phonekit as mod

    return mod


def optimum_parser() -> argparse.ArgumentParser:
    """optimum-cli's parser, registered the way optimum's main() does it (namespace discovery)."""
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import (OPTIMUM_CLI_ROOT_SUBCOMMANDS, load_optimum_namespace_cli_commands,
                                              register_optimum_cli_subcommand, resolve_command_to_command_instance)

    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    for cls in OPTIMUM_CLI_ROOT_SUBCOMMANDS:
        register_optimum_cli_subcommand(cls, parent_command=root)
    found = load_optimum_namespace_cli_commands()
    parents = resolve_command_to_command_instance(root, [p for _, p in found if p is not None])
    for cmd, parent in found:
        register_optimum_cli_subcommand(cmd, parent_command=root if parent is None else parents[parent])
    return root.parser


def optimum_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """optimum-cli's own main() in this process: its exit status."""
    from optimum.commands.optimum_cli import main

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *argv])
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One block: the XNNPACK lowering of each export dominates this file's run time.
    lm = make_tiny_lm("mobilellm", num_hidden_layers=1)
    return write_hf_checkpoint(lm, tmp_path_factory.mktemp("ckpt") / "tiny-hf")


# -- discovery and help ---------------------------------------------------------------------------

def test_registered_under_optimum_cli_export() -> None:
    mod = plugin()
    from optimum.commands.export.base import ExportCommand

    assert mod.REGISTER_COMMANDS == [(mod.PhonekitExportCommand, ExportCommand)]
    # No __init__.py may sit in the shared namespace (PEP 420), or other plugins vanish.
    import importlib.util

    spec = importlib.util.find_spec("optimum.commands.register")
    locations = [Path(p) for p in spec.submodule_search_locations if Path(p).is_dir()]
    assert any((p / "register_phonekit.py").is_file() for p in locations)
    assert not any((p / "__init__.py").exists() for p in locations)
    ns = optimum_parser().parse_args(["export", "phonekit", "-m", "x", "--format", "pte", "out"])
    assert isinstance(ns.func(ns), mod.PhonekitExportCommand)


def test_help_from_the_installed_optimum_cli() -> None:
    r = subprocess.run([str(OPTIMUM_CLI), "export", "phonekit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("usage: optimum-cli export phonekit")
    for opt in ("--model MODEL", "--target {android,ios,all}", "--quant QUANT", "--context CONTEXT",
                "--device PROFILE", "--quant-embedding", "--budget-fraction", "--allow-over-budget", "OUTPUT"):
        assert opt in out, opt
    assert "Runs the same export as `phonekit export" in out
    assert "example:\n  optimum-cli export phonekit --model smollm2-135m-instruct --target android" in out
    r = subprocess.run([str(OPTIMUM_CLI), "export", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "phonekit" in r.stdout


def test_plugin_does_not_import_torch_at_cli_start() -> None:
    """optimum imports every registered plugin on every optimum-cli start; building the
    parser must stay light (torch, the model and exporters load only in run())."""
    code = ("import sys\n"
            "import optimum.commands.register.register_phonekit as m\n"
            "import argparse\n"
            "m.add_arguments(argparse.ArgumentParser())\n"
            "print(sorted(k for k in ('torch', 'executorch', 'onnx', 'coremltools', 'transformers') if k in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"heavy modules imported while building the parser: {r.stdout.strip()}"


# -- the same request -----------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    ["--format", "pte"],
    ["--target", "android", "--target", "ios", "--quant", "8da4w-g64", "--quant-embedding", "8w", "--context", "256",
     "--device", "pixel-8", "--device", "iphone-15", "--budget-fraction", "0.2", "--allow-over-budget",
     "--force", "--json", "--quiet", "--random-weights"],
])
def test_namespace_equals_phonekit_export(opts: list[str]) -> None:
    from phonekit.export.commands import export as export_cmd

    pk = build_parser().parse_args(["export", "smollm2-135m-instruct", *opts, "--out", "bundles/x"])
    ns = optimum_parser().parse_args(["export", "phonekit", "--model", "smollm2-135m-instruct", *opts, "bundles/x"])
    mine = plugin().phonekit_namespace(ns.func(ns).args)
    assert vars(mine) == vars(pk)
    assert mine.func is export_cmd.run


def test_same_bundle_as_phonekit_export(tiny_folder: Path, tmp_path: Path) -> None:
    """The issue's command line through the installed optimum-cli script, in its own
    process (so per-process state such as hash seeds cannot make two exports agree by
    accident), against `phonekit export` with the same options."""
    from phonekit.export.bundle import read_manifest, verify_files
    from phonekit.export.model_card import render_card

    opts = ["--target", "android", "--quant", "8da4w", "--context", "32", "--device", "pixel-8", "--quiet"]
    a, b = tmp_path / "phonekit", tmp_path / "optimum"
    assert phonekit_main(["export", str(tiny_folder), *opts, "--out", str(a)]) == 0
    r = subprocess.run([str(OPTIMUM_CLI), "export", "phonekit", "--model", str(tiny_folder), *opts, str(b)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ha, hb = tree_hashes(a), tree_hashes(b)
    assert ha == hb
    manifest = read_manifest(b)
    assert [x["format"] for x in manifest["artifacts"]] == ["pte", "onnx"]  # --target android
    assert manifest["context_length"] == 32
    assert [(v["device"], v["format"]) for v in manifest["budget"]["verdicts"]] == [("pixel-8", "pte"), ("pixel-8", "onnx")]
    verify_files(b, manifest)
    listed = {f["path"] for f in manifest["tokenizer"]["files"]} | {f["path"] for x in manifest["artifacts"] for f in x["files"]}
    assert listed | {"manifest.json", "README.md"} == set(hb)
    # The model card in the bundle is rendered from exactly this manifest.
    assert (b / "README.md").read_text(encoding="utf-8") == render_card(manifest)
    assert json.loads((a / "manifest.json").read_text()) == manifest


# -- the same errors ------------------------------------------------------------------------------

ERROR_CASES = [
    # (name, options, exit code, text the one-line message contains)
    ("unknown scheme", ["--format", "pte", "--quant", "q9"], 2, "--quant 'q9'"),
    ("context over the model's", ["--format", "pte", "--context", "100000"], 2, "--context 100000"),
    ("nothing to build", [], 2, "say what to build"),
    ("bad budget fraction", ["--format", "pte", "--budget-fraction", "1.5"], 2, "--budget-fraction 1.5"),
    ("over budget", ["--format", "pte", "--device", "pixel-8", "--budget-fraction", "0.0000001"], 3, "pixel-8"),
]


def _error_line(err: str, prefix: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0][len(prefix):]


@pytest.mark.parametrize("name, opts, code, text", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_same_message_and_exit_code(name: str, opts: list[str], code: int, text: str, tiny_folder: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert phonekit_main(["export", str(tiny_folder), *opts, "--quiet", "--out", str(a)]) == code
    pk = _error_line(capsys.readouterr().err, PK_PREFIX)
    assert optimum_main(["export", "phonekit", "-m", str(tiny_folder), *opts, "--quiet", str(b)], monkeypatch) == code
    opt = _error_line(capsys.readouterr().err, OPT_PREFIX)
    assert opt == pk and text in pk
    assert not a.exists() and not b.exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == []


def test_existing_output_same_error_and_untouched(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert phonekit_main(["export", str(tiny_folder), "--format", "pte", "--out", str(out)]) == 2
    pk = _error_line(capsys.readouterr().err, PK_PREFIX)
    assert optimum_main(["export", "phonekit", "-m", str(tiny_folder), "--format", "pte", str(out)], monkeypatch) == 2
    assert _error_line(capsys.readouterr().err, OPT_PREFIX) == pk
    assert "already exists" in pk and "--force" in pk
    assert tree_hashes(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


def test_unknown_model_same_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no-such-model")
    assert phonekit_main(["export", missing, "--format", "pte", "--quiet", "--out", str(tmp_path / "a")]) == 2
    pk = _error_line(capsys.readouterr().err, PK_PREFIX)
    assert optimum_main(["export", "phonekit", "-m", missing, "--format", "pte", "--quiet", str(tmp_path / "b")], monkeypatch) == 2
    assert _error_line(capsys.readouterr().err, OPT_PREFIX) == pk
    assert "no-such-model" in pk


@pytest.mark.parametrize("argv, needle", [
    (["--target", "phone", "OUT"], "invalid choice: 'phone'"),
    (["--format", "pte"], "the following arguments are required"),
])
def test_argparse_errors_exit_2(argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert optimum_main(["export", "phonekit", *argv], monkeypatch) == 2
    assert needle in capsys.readouterr().err


def test_installed_script_exit_code_and_one_line(tmp_path: Path) -> None:
    """Through the real console script: optimum's main() drops run()'s result, so the
    plugin must exit with phonekit's code itself; the message is one line, no traceback."""
    r = subprocess.run([str(OPTIMUM_CLI), "export", "phonekit", "-m", str(tmp_path / "nope"), "--format", "pte",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("…")]
    assert len(lines) == 1 and lines[0].startswith(OPT_PREFIX), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# -- `pip install .` (not editable) ---------------------------------------------------------------

def test_regular_install_places_the_plugin_in_the_namespace(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources, install it into a folder (never into
    .venv), and run optimum-cli's discovery with only that folder and site-packages on
    the path (-S: no .pth, so the editable install is out of the picture)."""
    import site
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    import tomllib

    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert package_dirs["optimum.commands.register"] == "optimum_plugin"
    for folder in sorted({d.split("/")[0] for d in package_dirs.values()}):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = wheels.glob("phonekit-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "optimum/commands/register/register_phonekit.py" in names
    # The namespace stays a namespace: no __init__.py at any of its levels.
    assert not [n for n in names if n.startswith("optimum/") and n.endswith("__init__.py")]

    target = tmp_path / "target"
    r = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(whl)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import sys\n"
            "sys.argv = ['optimum-cli', 'export', 'phonekit', '--help']\n"
            "import phonekit\n"
            "print('phonekit from', phonekit.__file__)\n"
            "from optimum.commands.optimum_cli import main\n"
            "main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()])}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"phonekit from {target}" in r.stdout
    assert "usage: optimum-cli export phonekit" in r.stdout and "--target {android,ios,all}" in r.stdout
