"""``phonekit push``: adb and xcrun are replaced by fake scripts on PATH that act on a
folder standing in for the phone, so the copy, the on-phone sha256 check and every error
path run for real without a device."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_lm
from phonekit.export.bundle import Artifact, BundleWriter, base_manifest, read_manifest, validate_manifest, verify_files
from phonekit.export.cli import main

PKG = "dev.phonekit.sample"


def write_bundle(out: Path, formats: tuple[str, ...] = ("pte",), budget: dict | None = None, family: str = "mobilellm") -> Path:
    """A real manifest (base_manifest + Artifact.to_manifest, as phonekit export writes them)
    over a tiny model; artifact files hold seeded bytes, since only their hashes matter here."""
    import random

    from phonekit.quant import make_plan, parse_embedding, parse_scheme

    lm = make_tiny_lm(family)
    rng = random.Random(7)
    plan = make_plan(lm.model, parse_scheme("fp32"), parse_embedding("none"), "pte")
    with BundleWriter(out) as w:
        root = w.root
        manifest = base_manifest(lm, 64, plan.summary(), root)
        for fmt in formats:
            if fmt == "pte":
                (root / "model.pte").write_bytes(rng.randbytes(5000))
                art = Artifact("pte", "model.pte", "xnnpack", ["android", "ios"], "executorch 1.5.1")
            elif fmt == "onnx":
                (root / "model.onnx").write_bytes(rng.randbytes(3000))
                (root / "genai_config.json").write_text('{"model": {}}\n')
                genai = {"compatible": family != "plm"}
                if family == "plm":
                    genai["reason"] = "the MLA latent cache has no onnxruntime-genai layout"
                art = Artifact("onnx", "model.onnx", "onnxruntime-cpu", ["android", "ios", "linux", "macos"],
                               "onnxruntime 1.32.0", extra_files=["genai_config.json"], details={"onnxruntime_genai": genai})
            else:
                pkg = root / "model.mlpackage"
                (pkg / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
                (pkg / "Manifest.json").write_text("{}\n")
                (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(rng.randbytes(700))
                (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(rng.randbytes(2000))
                art = Artifact("coreml", "model.mlpackage", "coreml", ["ios", "macos"], "coremltools 9.0")
            art.details.setdefault("quantization", plan.summary())
            manifest["artifacts"].append(art.to_manifest(root))
        manifest["budget"] = budget
        validate_manifest(manifest)
        w.write_json("manifest.json", manifest)
    return out


FAKE_ADB = r'''#!{python}
"""A stand-in for adb: the phone is the folder $FAKE_PHONE."""
import json, os, shlex, shutil, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_PHONE"])
with open(root / "adb.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
devices = dict(d.split(":") for d in os.environ.get("FAKE_DEVICES", "").split(",") if d)
installed = set(os.environ.get("FAKE_PACKAGES", "").split(","))
release = set(os.environ.get("FAKE_RELEASE", "").split(","))

def on_phone(text):
    return text.replace("/data/local/tmp", str(root / "data/local/tmp")).replace("/sdcard", str(root / "sdcard"))

args = sys.argv[1:]
if args == ["devices"]:
    print("List of devices attached")
    for serial, state in devices.items():
        print(f"{{serial}}\t{{state}}")
    sys.exit(0)
if args[:1] != ["-s"] or devices.get(args[1]) != "device":
    print(f"adb: device '{{args[1] if len(args) > 1 else ''}}' not found", file=sys.stderr)
    sys.exit(1)
args = args[2:]
if args[0] == "push":
    src, dest = Path(args[1]), Path(on_phone(args[2]))
    if dest.is_dir():
        dest = dest / src.name
    shutil.copytree(src, dest)
    if os.environ.get("FAKE_CORRUPT"):
        victim = sorted(p for p in dest.rglob("*") if p.is_file())[0]
        victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    print(f"{{src}}: pushed")
    sys.exit(0)
assert args[0] == "shell" and len(args) == 2, args
words = shlex.split(args[1])
if words[:2] == ["pm", "path"]:
    if words[2] in installed:
        print(f"package:/data/app/{{words[2]}}/base.apk")
        sys.exit(0)
    sys.exit(1)
cwd = root
if words[0] == "run-as":
    pkg = words[1]
    if pkg not in installed:
        print(f"run-as: unknown package: {{pkg}}", file=sys.stderr)
        sys.exit(1)
    if pkg in release:
        print(f"run-as: package not debuggable: {{pkg}}", file=sys.stderr)
        sys.exit(1)
    cwd = root / "data/user/0" / pkg
    cwd.mkdir(parents=True, exist_ok=True)
    words = words[2:]
else:
    words = ["sh", "-c", args[1]]
proc = subprocess.run([on_phone(w) for w in words], cwd=cwd, capture_output=True, text=True)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
sys.exit(proc.returncode)
'''

FAKE_XCRUN = r'''#!{python}
"""A stand-in for xcrun devicectl: the app's data container is $FAKE_PHONE/ios/<bundle id>."""
import json, os, shutil, sys
from pathlib import Path

root = Path(os.environ["FAKE_PHONE"])
with open(root / "xcrun.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_XCRUN_FAIL"):
    print("ERROR: The specified device was not found. (com.apple.dt.CoreDeviceError error 1000.)", file=sys.stderr)
    sys.exit(1)
a = sys.argv[1:]
opt = {{a[i]: a[i + 1] for i in range(4, len(a) - 1, 2)}}
dest = root / "ios" / opt["--domain-identifier"] / opt["--destination"]
if opt.get("--remove-existing-content") == "true" and dest.exists():
    shutil.rmtree(dest)
shutil.copytree(opt["--source"], dest)
'''


def _script(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(body.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("b") / "smol")


@pytest.fixture
def phone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holds only the fake tools (and sh/cp/sha256sum through /usr/bin and /bin)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    _script(tools, "adb", FAKE_ADB)
    root = tmp_path / "phone"
    root.mkdir()
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("FAKE_PHONE", str(root))
    monkeypatch.setenv("FAKE_DEVICES", "R58N1:device")
    monkeypatch.setenv("FAKE_PACKAGES", PKG)
    monkeypatch.delenv("ANDROID_HOME", raising=False)
    monkeypatch.delenv("ANDROID_SDK_ROOT", raising=False)
    return root


def _adb_calls(root: Path) -> list[list[str]]:
    log = root / "adb.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_push_android_copies_into_the_app_files_folder(bundle: Path, phone: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["push", "android", str(bundle), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    landed = phone / "data/user/0" / PKG / "files/bundles/smol"
    assert out["path"] == f"/data/user/0/{PKG}/files/bundles/smol" and out["device"] == "R58N1" and out["name"] == "smol"
    manifest = read_manifest(landed)
    verify_files(landed, manifest)  # every byte arrived
    assert out["files"] == len(manifest["tokenizer"]["files"]) + len(manifest["artifacts"][0]["files"]) + 1
    assert out["bytes"] == sum(p.stat().st_size for p in bundle.iterdir())
    assert not any((phone / "data/local/tmp/phonekit").iterdir())  # the staging copy is removed
    calls = _adb_calls(phone)
    assert ["-s", "R58N1", "push", str(bundle), "/data/local/tmp/phonekit/smol"] in calls
    assert any(c[:3] == ["-s", "R58N1", "shell"] and c[3].startswith(f"run-as {PKG} sh -c") and "sha256sum" in c[3] for c in calls)


def test_push_android_replaces_an_older_copy_and_takes_a_name(bundle: Path, phone: Path, capsys: pytest.CaptureFixture) -> None:
    stale = phone / "data/user/0" / PKG / "files/bundles/demo"
    stale.mkdir(parents=True)
    (stale / "old.pte").write_bytes(b"old")
    assert main(["push", "android", str(bundle), "--name", "demo"]) == 0
    assert not (stale / "old.pte").exists()
    verify_files(stale, read_manifest(stale))
    assert "files/bundles/demo" in capsys.readouterr().out


def test_push_android_external_folder_for_release_builds(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FAKE_RELEASE", PKG)
    assert main(["push", "android", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"phonekit push: error: {PKG} on R58N1 is a release build, so run-as cannot write its files: "
                           "install the debug build, or pass --external")
    assert not (phone / "data/local/tmp/phonekit/smol").exists()  # staging removed on failure too
    assert main(["push", "android", str(bundle), "--external"]) == 0
    landed = phone / "sdcard/Android/data" / PKG / "files/bundles/smol"
    verify_files(landed, read_manifest(landed))


def test_push_android_without_adb(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    empty = phone.parent / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main(["push", "android", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phonekit push: error: adb not found: install Android platform-tools") and err.count("\n") == 1


def test_push_android_finds_adb_through_android_home(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = phone.parent / "sdk"
    (sdk / "platform-tools").mkdir(parents=True)
    _script(sdk / "platform-tools", "adb", FAKE_ADB)
    empty = phone.parent / "empty"
    empty.mkdir()
    # sh/cp/sha256sum still come from the system folders, only adb moves.
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin")
    (phone.parent / "bin" / "adb").unlink()
    monkeypatch.setenv("ANDROID_HOME", str(sdk))
    assert main(["push", "android", str(bundle)]) == 0
    assert (phone / "data/user/0" / PKG / "files/bundles/smol/manifest.json").is_file()


@pytest.mark.parametrize("devices, serial, message", [
    ("", None, "no Android device attached (adb devices lists none): connect the phone by USB with USB debugging on "
               "(Settings > Developer options), or start an emulator"),
    ("R58N1:unauthorized", None, "device R58N1 is unauthorized: unlock the phone and accept the 'Allow USB debugging' prompt"),
    ("A1:device,B2:device", None, "several devices attached (A1, B2): pass --serial with one of them"),
    ("A1:device", "Z9", "--serial Z9: no such device attached (adb devices lists: A1)"),
    ("A1:offline", "A1", "device A1 is offline: reconnect the cable, or run `adb kill-server` and try again"),
])
def test_push_android_device_errors(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                    devices: str, serial: str | None, message: str) -> None:
    monkeypatch.setenv("FAKE_DEVICES", devices)
    argv = ["push", "android", str(bundle)] + (["--serial", serial] if serial else [])
    assert main(argv) == 2
    assert capsys.readouterr().err == f"phonekit push: error: {message}\n"
    assert not any(c[2] == "push" for c in _adb_calls(phone) if len(c) > 2)


def test_push_android_picks_the_named_serial(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DEVICES", "A1:device,B2:device")
    assert main(["push", "android", str(bundle), "--serial", "B2"]) == 0
    assert all(c[:2] == ["-s", "B2"] for c in _adb_calls(phone) if c != ["devices"])


def test_push_android_app_not_installed(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FAKE_PACKAGES", "com.other.app")
    assert main(["push", "android", str(bundle)]) == 2
    assert capsys.readouterr().err == (f"phonekit push: error: the app {PKG} is not installed on R58N1: build and install "
                                       "android_app (cd android_app && ./gradlew installDebug), then push again\n")


def test_push_android_detects_a_bad_copy_on_the_phone(bundle: Path, phone: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FAKE_CORRUPT", "1")
    assert main(["push", "android", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phonekit push: error: after the copy, 1 file(s) on the phone differ from the bundle (")
    # Nothing half-copied is left for the app to list, and the staging copy is gone.
    assert not (phone / "data/user/0" / PKG / "files/bundles/smol").exists()
    assert not (phone / "data/local/tmp/phonekit/smol").exists()


def test_push_refuses_a_tampered_bundle_before_touching_the_phone(bundle: Path, phone: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    data = (copy / "model.pte").read_bytes()
    (copy / "model.pte").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert main(["push", "android", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err == (f"phonekit push: error: {copy / 'model.pte'}: sha256 does not match manifest.json; "
                   "the file was modified or corrupted, re-export the bundle\n")
    assert _adb_calls(phone) == []


@pytest.mark.parametrize("argv, message", [
    (["--name", "../evil"], "--name '../evil': use letters, digits, '.', '_' and '-' only (it becomes a folder on the phone)"),
    (["--device", "X"], "--device: not an option for android; see phonekit push --help"),
    (["--manual"], "--manual: not an option for android; see phonekit push --help"),
])
def test_push_bad_arguments(bundle: Path, phone: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert main(["push", "android", str(bundle), *argv]) == 2
    assert capsys.readouterr().err == f"phonekit push: error: {message}\n"


def test_push_not_a_bundle(tmp_path: Path, phone: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["push", "android", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["push", "android", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == (f"phonekit push: error: {tmp_path / 'empty' / 'manifest.json'}: not found; "
                                       "pass a folder written by phonekit export\n")


def test_push_ios_without_xcrun_points_to_the_manual_steps(bundle: Path, phone: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["push", "ios", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err == ("phonekit push: error: copying to an iPhone needs a Mac with Xcode 15 or later (xcrun devicectl), which this "
                   f"machine lacks; `phonekit push ios {bundle} --manual` prints the Finder / Files steps\n")


def test_push_ios_manual_prints_the_steps(bundle: Path, phone: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["push", "ios", str(bundle), "--manual"]) == 0
    out = capsys.readouterr().out
    assert "Finder" in out and "Files tab" in out and 'onto "phonekit Chat"' in out and "tap Import" in out
    assert f"phonekit push ios {bundle} --device" in out and "pick 'smol'" in out


def test_push_ios_with_devicectl(bundle: Path, phone: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    _script(phone.parent / "bin", "xcrun", FAKE_XCRUN)
    assert main(["push", "ios", str(bundle)]) == 2
    assert capsys.readouterr().err == ("phonekit push: error: pass --device with the iPhone's identifier "
                                       "(list them with `xcrun devicectl list devices`)\n")
    assert main(["push", "ios", str(bundle), "--device", "00008130-001A", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "Documents/smol" and out["package"] == "dev.phonekit.sample"
    calls = [json.loads(line) for line in (phone / "xcrun.log").read_text().splitlines()]
    assert calls == [["devicectl", "device", "copy", "to", "--device", "00008130-001A", "--domain-type", "appDataContainer",
                      "--domain-identifier", "dev.phonekit.sample", "--source", str(bundle.resolve()),
                      "--destination", "Documents/smol", "--remove-existing-content", "true"]]
    landed = phone / "ios/dev.phonekit.sample/Documents/smol"
    verify_files(landed, read_manifest(landed))
    monkeypatch.setenv("FAKE_XCRUN_FAIL", "1")
    assert main(["push", "ios", str(bundle), "--device", "00008130-001A"]) == 2
    assert capsys.readouterr().err.startswith(
        "phonekit push: error: xcrun devicectl could not copy the bundle (ERROR: The specified device was not found.")
