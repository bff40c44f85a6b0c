"""``phonekit push``: copy a bundle into the sample app on a phone.

Android (``adb``): the bundle goes to ``/data/local/tmp`` first, then ``run-as`` copies it
into the app's private ``files/bundles/NAME`` (debug builds allow ``run-as``; this is how
Android Studio's Device Explorer uploads too). ``--external`` writes to the app's external
files folder ``/sdcard/Android/data/PKG/files/bundles/NAME`` instead, for release builds.
Either way every file's sha256 is checked on the phone afterwards.

iOS: with a Mac and Xcode 15+, ``xcrun devicectl device copy to`` writes into the app's
Documents folder. Elsewhere a copy cannot be automated (Apple has no Linux/Windows tool for
an app's container), so the command says so; ``--manual`` prints the Finder / Files steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phonekit.errors import BundleError, PhonekitError, UsageError
from phonekit.export.commands import verb_parser

# The sample apps' identifiers: android_app's applicationId, ios_app's bundle id
# (tests/test_apps.py checks they match the app projects).
ANDROID_PACKAGE = "dev.phonekit.sample"
IOS_BUNDLE_ID = "dev.phonekit.sample"
IOS_APP_NAME = "phonekit Chat"
REMOTE_TMP = "/data/local/tmp/phonekit"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "push", "Copy a bundle into the sample app on a phone (Android: adb; iOS: xcrun devicectl or the Finder steps).",
                    "phonekit push android bundles/smol --serial R58N12ABC")
    p.add_argument("platform", choices=["android", "ios"], help="which phone")
    p.add_argument("bundle", type=Path, help="bundle folder written by phonekit export")
    p.add_argument("--name", help="folder name on the phone (default: the bundle folder's name)")
    p.add_argument("--serial", help="android: the adb serial of the phone (see `adb devices`); needed when several are attached")
    p.add_argument("--package", default=ANDROID_PACKAGE, help=f"android: the app's package (default {ANDROID_PACKAGE})")
    p.add_argument("--external", action="store_true",
                   help="android: copy into the app's external files folder (works with release builds; no run-as)")
    p.add_argument("--device", help="ios: the iPhone's identifier (see `xcrun devicectl list devices`)")
    p.add_argument("--bundle-id", default=IOS_BUNDLE_ID, help=f"ios: the app's bundle identifier (default {IOS_BUNDLE_ID})")
    p.add_argument("--manual", action="store_true", help="ios: print the steps to copy the bundle with Finder or the Files app")
    p.add_argument("--json", action="store_true", help="print where the bundle went as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    wrong = [flag for flag, value, platform in (
        ("--serial", args.serial, "android"), ("--external", args.external, "android"),
        ("--device", args.device, "ios"), ("--manual", args.manual, "ios"),
        ("--package", args.package != ANDROID_PACKAGE, "android"), ("--bundle-id", args.bundle_id != IOS_BUNDLE_ID, "ios"),
    ) if value and platform != args.platform]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: not an option for {args.platform}; see phonekit push --help")
    bundle = args.bundle
    if not bundle.is_dir():
        raise UsageError(f"{bundle}: not a folder; pass a bundle folder written by phonekit export")
    name = args.name or bundle.resolve().name
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (it becomes a folder on the phone)")
    manifest = _checked_bundle(bundle)
    if args.platform == "ios":
        return _push_ios(args, bundle, name, manifest)
    return _push_android(args, bundle, name, manifest)


def _checked_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest, after checking every listed file: a broken bundle is not copied."""
    from phonekit.export.bundle import read_manifest, verify_files

    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    return manifest


def _listed_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    entries = {f["path"]: f for f in manifest["tokenizer"]["files"]}
    for art in manifest["artifacts"]:
        entries.update({f["path"]: f for f in art["files"]})
    return sorted(entries.values(), key=lambda f: f["path"])


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result))
        return
    print(f"pushed {result['name']} ({result['bytes'] / 1e6:.1f} MB, {result['files']} files) to "
          f"{result['device']}:{result['path']} in {result['seconds']:.1f} s")
    print(f"open {IOS_APP_NAME} on the phone and pick '{result['name']}'")


# ---------------------------------------------------------------- Android (adb)

@dataclass
class Adb:
    exe: str
    serial: str

    def run(self, *args: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
        return _run([self.exe, "-s", self.serial, *args], timeout)

    def shell(self, command: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
        # adb joins its arguments into one command line for the phone's shell: pass one string.
        return self.run("shell", command, timeout=timeout)


def _run(cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"`{' '.join(cmd[:4])} ...` did not answer in {timeout:.0f} s; check the USB connection and run `adb devices`") from None
    except OSError as e:
        raise UsageError(f"{cmd[0]}: cannot run it ({e.strerror})") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    """The last line of stderr (else stdout): where adb and devicectl put the reason."""
    text = (proc.stderr or "").strip() or (proc.stdout or "").strip()
    return text.splitlines()[-1] if text else f"exit code {proc.returncode}"


def find_adb() -> str:
    exe = shutil.which("adb")
    if exe:
        return exe
    for var in ("ANDROID_HOME", "ANDROID_SDK_ROOT"):
        root = os.environ.get(var)
        candidate = Path(root, "platform-tools", "adb.exe" if os.name == "nt" else "adb") if root else None
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise UsageError("adb not found: install Android platform-tools (Android Studio > SDK Manager, or "
                     "`sdkmanager platform-tools`) and put adb on PATH or set ANDROID_HOME")


def pick_device(exe: str, serial: str | None) -> str:
    proc = _run([exe, "devices"], 60)
    if proc.returncode != 0:
        raise UsageError(f"adb devices failed ({_last_line(proc)}); restart the server with `adb kill-server`")
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    hints = {"unauthorized": "unlock the phone and accept the 'Allow USB debugging' prompt",
             "offline": "reconnect the cable, or run `adb kill-server` and try again"}
    if serial is not None:
        state = states.get(serial)
        if state is None:
            listed = ", ".join(states) or "none"
            raise UsageError(f"--serial {serial}: no such device attached (adb devices lists: {listed})")
        if state != "device":
            raise UsageError(f"device {serial} is {state}: {hints.get(state, 'check it with `adb devices`')}")
        return serial
    ready = [s for s, st in states.items() if st == "device"]
    if len(ready) == 1:
        return ready[0]
    if len(ready) > 1:
        raise UsageError(f"several devices attached ({', '.join(ready)}): pass --serial with one of them")
    if states:
        s, st = next(iter(states.items()))
        raise UsageError(f"device {s} is {st}: {hints.get(st, 'check it with `adb devices`')}")
    raise UsageError("no Android device attached (adb devices lists none): connect the phone by USB with "
                     "USB debugging on (Settings > Developer options), or start an emulator")


def _push_android(args: argparse.Namespace, bundle: Path, name: str, manifest: dict[str, Any]) -> int:
    exe = find_adb()
    adb = Adb(exe, pick_device(exe, args.serial))
    pkg = args.package
    installed = adb.shell(f"pm path {shlex.quote(pkg)}")
    if installed.returncode != 0 or "package:" not in installed.stdout:
        raise UsageError(f"the app {pkg} is not installed on {adb.serial}: build and install android_app "
                         "(cd android_app && ./gradlew installDebug), then push again")
    start = time.monotonic()
    if args.external:
        folder = f"/sdcard/Android/data/{pkg}/files/bundles/{name}"
        run_as, shown, staging = None, folder, None
    else:
        # run-as starts in the app's data folder, /data/user/0/PKG.
        folder, run_as, shown = f"files/bundles/{name}", pkg, f"/data/user/0/{pkg}/files/bundles/{name}"
        staging = f"{REMOTE_TMP}/{name}"
    files = _listed_files(manifest)
    try:
        if staging is None:
            parent = folder.rsplit("/", 1)[0]
            _checked(adb.shell(f"rm -rf {shlex.quote(folder)} && mkdir -p {shlex.quote(parent)}"), "prepare the folder on the phone")
            _checked(adb.run("push", str(bundle), folder, timeout=None), "adb push")
        else:
            _checked(adb.shell(f"rm -rf {shlex.quote(staging)} && mkdir -p {REMOTE_TMP}"), "prepare /data/local/tmp")
            _checked(adb.run("push", str(bundle), staging, timeout=None), "adb push")
            copied = _in_app(adb, run_as, f"mkdir -p files/bundles && rm -rf {folder} && cp -R {staging} {folder}")
            if copied.returncode != 0:
                detail = _last_line(copied)
                if "not debuggable" in detail:
                    raise UsageError(f"{pkg} on {adb.serial} is a release build, so run-as cannot write its files: "
                                     "install the debug build, or pass --external")
                raise UsageError(f"copying into {pkg}'s files folder failed ({detail}); try --external")
        _verify_remote(adb, folder, run_as, files, bundle)
    except PhonekitError:
        # Nothing half-copied stays behind: the app would list a bundle that fails its checks.
        _in_app(adb, run_as, f"rm -rf {shlex.quote(folder)}")
        raise
    finally:
        if staging is not None:
            adb.shell(f"rm -rf {shlex.quote(staging)}")
    total = sum(f["bytes"] for f in files) + (bundle / "manifest.json").stat().st_size
    _report(args, {"platform": "android", "device": adb.serial, "package": pkg, "name": name, "path": shown,
                   "files": len(files) + 1, "bytes": total, "seconds": round(time.monotonic() - start, 2)})
    return 0


def _checked(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise UsageError(f"{what} failed ({_last_line(proc)}); check the phone's free storage and `adb devices`")


def _in_app(adb: Adb, run_as: str | None, script: str) -> subprocess.CompletedProcess:
    """Run a shell script on the phone, as the app (run-as, in its data folder) when asked."""
    return adb.shell(f"run-as {shlex.quote(run_as)} sh -c {shlex.quote(script)}" if run_as else script, timeout=None)


def _verify_remote(adb: Adb, folder: str, run_as: str | None, files: list[dict[str, Any]], bundle: Path) -> None:
    """sha256 of every copied file, computed on the phone (toybox sha256sum)."""
    from phonekit.export.bundle import sha256_file

    expected = {f["path"]: f["sha256"] for f in files}
    expected["manifest.json"] = sha256_file(bundle / "manifest.json")
    proc = _in_app(adb, run_as, f"cd {shlex.quote(folder)} && sha256sum " + " ".join(shlex.quote(p) for p in sorted(expected)))
    got: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            got[parts[1].strip().lstrip("*")] = parts[0].lower()
    bad = sorted(p for p, h in expected.items() if got.get(p) != h)
    if bad:
        raise BundleError(f"after the copy, {len(bad)} file(s) on the phone differ from the bundle ({', '.join(bad[:3])}); "
                          "check the phone's free storage and push again")


# ---------------------------------------------------------------- iOS

def ios_steps(bundle: Path, name: str) -> str:
    return f"""To copy {bundle} onto an iPhone by hand:
  1. Build and run ios_app on the iPhone from Xcode once (this creates the app's Documents folder).
  2a. Finder (macOS): connect the iPhone, select it in the Finder sidebar, open the Files tab,
      and drag the folder {bundle.name} onto "{IOS_APP_NAME}".
  2b. Files app (any computer): put the folder {bundle.name} in iCloud Drive (or on a USB drive),
      open {IOS_APP_NAME}, tap Import and pick the folder; the app copies it into its Documents.
  2c. Mac with Xcode 15+: phonekit push ios {bundle} --device <id from `xcrun devicectl list devices`>
  3. In {IOS_APP_NAME}, pick '{name}': the app checks every file's sha256 before loading."""


def _push_ios(args: argparse.Namespace, bundle: Path, name: str, manifest: dict[str, Any]) -> int:
    if args.manual:
        print(ios_steps(bundle, name))
        return 0
    xcrun = shutil.which("xcrun")
    if xcrun is None:
        raise UsageError("copying to an iPhone needs a Mac with Xcode 15 or later (xcrun devicectl), which this "
                         f"machine lacks; `phonekit push ios {bundle} --manual` prints the Finder / Files steps")
    if not args.device:
        raise UsageError("pass --device with the iPhone's identifier (list them with `xcrun devicectl list devices`)")
    start = time.monotonic()
    dest = f"Documents/{name}"
    # devicectl copies the folder's contents into the destination, replacing what was there.
    proc = _run([xcrun, "devicectl", "device", "copy", "to", "--device", args.device,
                 "--domain-type", "appDataContainer", "--domain-identifier", args.bundle_id,
                 "--source", str(bundle.resolve()), "--destination", dest, "--remove-existing-content", "true"], None)
    if proc.returncode != 0:
        raise UsageError(f"xcrun devicectl could not copy the bundle ({_last_line(proc)}); is {IOS_APP_NAME} "
                         f"({args.bundle_id}) installed from Xcode and the iPhone unlocked and paired?")
    files = _listed_files(manifest)
    total = sum(f["bytes"] for f in files) + (bundle / "manifest.json").stat().st_size
    _report(args, {"platform": "ios", "device": args.device, "package": args.bundle_id, "name": name, "path": dest,
                   "files": len(files) + 1, "bytes": total, "seconds": round(time.monotonic() - start, 2)})
    return 0
