"""Device profiles: one TOML file per device in ``profiles/devices/``, or a user's own file by path.

A profile names a device, its DRAM and what the OS lets one app use. The memory
budget is a fraction of DRAM (MobileLLM's rule: about 10 %), minus memory the OS
is known to reserve for itself (``os_limit.reserved_gb``, e.g. Pixel 10's AICore).
GB in profiles are decimal (10^9 bytes), as phone makers state them; see
``../shared/reference/devices.md`` for every figure and its source.

    name = "iPhone 15"                 # required
    aliases = ["iphone-15-plus"]       # optional; the file name (``iphone-15``) is always one
    os = "iOS"                         # required: iOS, Android, Linux, ...
    soc = "Apple A16 Bionic"           # required
    dram_gb = 6                        # required, > 0
    year = 2023                        # optional
    memory_type = "LPDDR5"             # optional
    peak_bandwidth_gbps = 51.2         # optional
    [os_limit]                         # optional
    app_limit_gb = 3.06                # the OS per-app ceiling (iOS jetsam default)
    entitled_limit_gb = 4.2            # with the increased-memory-limit entitlement
    reserved_gb = 0                    # memory the OS keeps for itself
    notes = "..."
    [sources]                          # required: where each figure comes from; ``dram`` at least
    dram = "..."
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from phonekit.errors import ProfileError

GB = 10**9
_TOP_FIELDS = {"name", "aliases", "os", "year", "soc", "dram_gb", "memory_type", "peak_bandwidth_gbps", "os_limit", "sources"}
_LIMIT_FIELDS = {"app_limit_gb", "entitled_limit_gb", "reserved_gb", "notes"}


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    os: str
    soc: str
    dram_bytes: int
    aliases: tuple[str, ...] = ()
    year: int | None = None
    memory_type: str | None = None
    peak_bandwidth_gbps: float | None = None
    app_limit_bytes: int | None = None  # OS per-app ceiling without special entitlements; None = no fixed ceiling
    entitled_limit_bytes: int | None = None
    reserved_bytes: int = 0
    notes: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # the file it was read from

    def budget_bytes(self, fraction: float) -> int:
        """``fraction`` of the DRAM left to apps (DRAM minus what the OS reserves)."""
        return int(fraction * (self.dram_bytes - self.reserved_bytes))

    def fits_os_limit(self, nbytes: int) -> bool | None:
        """Whether ``nbytes`` stays under the per-app ceiling; None where the OS sets none (Android, Linux)."""
        return None if self.app_limit_bytes is None else nbytes <= self.app_limit_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "aliases": list(self.aliases), "os": self.os, "soc": self.soc,
            "year": self.year, "dram_bytes": self.dram_bytes, "memory_type": self.memory_type,
            "peak_bandwidth_gbps": self.peak_bandwidth_gbps, "app_limit_bytes": self.app_limit_bytes,
            "entitled_limit_bytes": self.entitled_limit_bytes, "reserved_bytes": self.reserved_bytes,
            "notes": self.notes, "sources": dict(self.sources), "path": self.path,
        }


def normalize(name: str) -> str:
    """``"iPhone 15 Pro_Max"`` -> ``"iphone-15-pro-max"``: the form ids and aliases are matched in."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _number(where: str, key: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{where}: field {key}: must be a number (got {value!r}); fix the file")
    if value < 0 or (positive and value == 0):
        raise ProfileError(f"{where}: field {key}: must be {'positive' if positive else 'zero or more'} (got {value!r}); fix the file")
    return float(value)


def _text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: field {key}: must be a non-empty string (got {value!r}); fix the file")
    return value


def parse_profile(data: dict[str, Any], pid: str, where: str) -> DeviceProfile:
    """A profile from parsed TOML; every problem is a one-line ``ProfileError`` naming the file and field."""
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise ProfileError(f"{where}: field {unknown[0]}: unknown; allowed fields are {', '.join(sorted(_TOP_FIELDS))}")
    for key in ("name", "os", "soc", "dram_gb", "sources"):
        if key not in data:
            raise ProfileError(f"{where}: field {key}: missing; every profile needs name, os, soc, dram_gb and [sources]")
    name = _text(where, "name", data["name"])
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ProfileError(f"{where}: field aliases: must be a list of strings (got {aliases!r}); fix the file")
    dram = _number(where, "dram_gb", data["dram_gb"])
    year = data.get("year")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
        raise ProfileError(f"{where}: field year: must be an integer (got {year!r}); fix the file")
    bw = data.get("peak_bandwidth_gbps")
    lim = data.get("os_limit", {})
    if not isinstance(lim, dict):
        raise ProfileError(f"{where}: field os_limit: must be a table ([os_limit]); fix the file")
    bad = sorted(set(lim) - _LIMIT_FIELDS)
    if bad:
        raise ProfileError(f"{where}: field os_limit.{bad[0]}: unknown; allowed: {', '.join(sorted(_LIMIT_FIELDS))}")
    limits = {k: _number(where, f"os_limit.{k}", lim[k], positive=k != "reserved_gb") for k in
              ("app_limit_gb", "entitled_limit_gb", "reserved_gb") if k in lim}
    if limits.get("reserved_gb", 0) >= dram:
        raise ProfileError(f"{where}: field os_limit.reserved_gb: {limits['reserved_gb']} is not below dram_gb {dram:g}; fix the file")
    for k in ("app_limit_gb", "entitled_limit_gb"):
        if limits.get(k, 0) > dram:
            raise ProfileError(f"{where}: field os_limit.{k}: {limits[k]:g} GB is more than dram_gb {dram:g}; fix the file")
    sources = data["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ProfileError(f"{where}: field sources: must be a table of strings ([sources] dram = \"...\"); fix the file")
    if "dram" not in sources:
        raise ProfileError(f"{where}: field sources.dram: missing; say where the DRAM figure comes from")
    notes = lim.get("notes")
    if notes is not None and not isinstance(notes, str):
        raise ProfileError(f"{where}: field os_limit.notes: must be a string; fix the file")
    return DeviceProfile(
        id=pid, name=name, os=_text(where, "os", data["os"]), soc=_text(where, "soc", data["soc"]),
        dram_bytes=int(round(dram * GB)), aliases=tuple(normalize(a) for a in aliases), year=year,
        memory_type=data.get("memory_type"),
        peak_bandwidth_gbps=None if bw is None else _number(where, "peak_bandwidth_gbps", bw),
        app_limit_bytes=None if "app_limit_gb" not in limits else int(round(limits["app_limit_gb"] * GB)),
        entitled_limit_bytes=None if "entitled_limit_gb" not in limits else int(round(limits["entitled_limit_gb"] * GB)),
        reserved_bytes=int(round(limits.get("reserved_gb", 0) * GB)), notes=notes, sources=dict(sources), path=where,
    )


def load_profile_file(path: str | Path) -> DeviceProfile:
    """A user's own profile file (same fields as the built-in ones)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ProfileError(f"{path}: no such profile file; pass a device name (phonekit devices) or an existing .toml path")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{p}: not valid TOML ({e}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{p}: cannot read it ({e}); check the file") from None
    return parse_profile(data, normalize(p.stem), str(p))


@lru_cache(maxsize=1)
def builtin_profiles() -> dict[str, DeviceProfile]:
    """The shipped profiles, by id (file name without .toml), sorted by OS then id (numbers as numbers)."""
    folder = resources.files("phonekit.profiles").joinpath("devices")
    out = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            pid = entry.name[: -len(".toml")]
            try:
                data = tomllib.loads(entry.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise ProfileError(f"{entry}: not valid TOML ({e}); the installation is damaged, reinstall phonekit") from None
            out[pid] = parse_profile(data, pid, f"profiles/devices/{entry.name}")
    return dict(sorted(out.items(), key=lambda kv: (kv[1].os, _natural(kv[0]))))


def _natural(text: str) -> list[Any]:
    """``pixel-6`` before ``pixel-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _index() -> dict[str, str]:
    """Every accepted spelling (id, alias, normalized display name) -> id."""
    idx: dict[str, str] = {}
    for pid, prof in builtin_profiles().items():
        for key in (pid, normalize(prof.name), *prof.aliases):
            idx.setdefault(key, pid)
    return idx


def resolve_device(spec: str) -> DeviceProfile:
    """A built-in profile by id, alias or name, or a profile file by path (``*.toml`` or a path with a slash)."""
    text = str(spec).strip()
    if text.lower().endswith(".toml") or "/" in text or "\\" in text:
        return load_profile_file(text)
    key = normalize(text)
    idx = _index()
    if key in idx:
        return builtin_profiles()[idx[key]]
    close = difflib.get_close_matches(key, list(idx), n=4, cutoff=0.6)
    close += [k for k in idx if key and key in k and k not in close]
    ids = list(dict.fromkeys(idx[k] for k in close))[:5]
    hint = f"close names: {', '.join(ids)}" if ids else "run phonekit devices for the list"
    raise ProfileError(f"--device {spec!r}: unknown device; {hint} (or pass a .toml profile file)")


def resolve_devices(specs: list[str]) -> list[DeviceProfile]:
    """Profiles for ``--device`` values, each once, in the order given."""
    seen: dict[tuple[str, str | None], DeviceProfile] = {}
    for s in specs:
        prof = resolve_device(s)
        seen.setdefault((prof.id, prof.path), prof)
    return list(seen.values())
