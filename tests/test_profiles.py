"""Device profiles: the shipped set, lookup by name/alias/path, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from phonekit.errors import ProfileError
from phonekit.export.cli import main
from phonekit.profiles.devices import builtin_profiles, load_profile_file, normalize, resolve_device, resolve_devices

REQUIRED = [
    "iphone-12", "iphone-12-pro", "iphone-13", "iphone-13-pro", "iphone-se-3", "iphone-14", "iphone-14-pro",
    "iphone-15", "iphone-15-pro", "iphone-16", "iphone-16-pro", "iphone-17", "iphone-air", "iphone-17-pro",
    "pixel-6", "pixel-6-pro", "pixel-7", "pixel-7-pro", "pixel-8", "pixel-8-pro", "pixel-9", "pixel-9-pro",
    "pixel-10", "pixel-10-pro", "galaxy-s21", "galaxy-s22", "galaxy-s23", "galaxy-s24", "galaxy-s25",
    "galaxy-a54", "galaxy-a55", "oneplus-12", "oneplus-13", "xiaomi-14", "xiaomi-15",
    "raspberry-pi-4-4gb", "raspberry-pi-4-8gb", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb",
]

GOOD = """
name = "Test Phone"
aliases = ["tp-1"]
os = "Android"
soc = "Test SoC"
dram_gb = 4
[os_limit]
reserved_gb = 1
[sources]
dram = "spec sheet"
"""


def test_builtin_set_covers_the_issue_and_every_profile_is_sourced() -> None:
    profs = builtin_profiles()
    assert len(profs) >= 25
    assert not [r for r in REQUIRED if r not in profs]
    for pid, p in profs.items():
        assert p.dram_bytes >= 4 * 10**9, pid
        assert p.sources.get("dram") and p.sources.get("os_limit"), pid
        assert p.os in ("iOS", "Android", "Linux"), pid
        if p.os == "iOS":  # jetsam ceilings are known for every iPhone generation here
            assert p.app_limit_bytes is not None and p.app_limit_bytes < p.entitled_limit_bytes < p.dram_bytes, pid
        else:
            assert p.app_limit_bytes is None, pid


def test_ids_and_aliases_are_unique() -> None:
    seen: dict[str, str] = {}
    for pid, p in builtin_profiles().items():
        for key in {pid, normalize(p.name), *p.aliases}:
            assert key not in seen or seen[key] == pid, f"{key} names both {seen.get(key)} and {pid}"
            seen[key] = pid


def test_budgets_are_a_fraction_of_dram_left_to_apps() -> None:
    # The paper's devices: iPhone 15 (6 GB) and Pixel 8 Pro (12 GB); GB are decimal.
    assert resolve_device("iphone-15").budget_bytes(0.10) == 600_000_000
    assert resolve_device("pixel-8-pro").budget_bytes(0.10) == 1_200_000_000
    # Pixel 10: 12 GB with ~3.5 GB reported reserved for AICore -> 10% of 8.5 GB.
    assert resolve_device("pixel-10").budget_bytes(0.10) == 850_000_000
    assert resolve_device("raspberry-pi-5-8gb").budget_bytes(0.25) == 2_000_000_000
    ip = resolve_device("iphone-15")
    assert ip.fits_os_limit(3_000_000_000) is True and ip.fits_os_limit(3_100_000_000) is False
    assert resolve_device("pixel-8").fits_os_limit(10**12) is None


@pytest.mark.parametrize("spelling", ["iphone-15-pro-max", "iPhone 15 Pro", "IPHONE_15_PRO", " iphone-15-pro "])
def test_lookup_by_alias_and_display_name(spelling: str) -> None:
    assert resolve_device(spelling).id == "iphone-15-pro"


def test_unknown_device_lists_close_names() -> None:
    with pytest.raises(ProfileError) as e:
        resolve_device("pixle-8-pro")
    msg = str(e.value)
    assert "'pixle-8-pro'" in msg and "pixel-8-pro" in msg and "\n" not in msg
    with pytest.raises(ProfileError, match="phonekit devices"):
        resolve_device("nokia-3310")


def test_user_profile_by_path(tmp_path) -> None:
    f = tmp_path / "my-phone.toml"
    f.write_text(GOOD)
    p = resolve_device(str(f))
    assert (p.id, p.name, p.dram_bytes, p.reserved_bytes) == ("my-phone", "Test Phone", 4 * 10**9, 10**9)
    assert p.budget_bytes(0.1) == 300_000_000
    assert [d.id for d in resolve_devices([str(f), "iphone-15", "iphone15", str(f)])] == ["my-phone", "iphone-15"]


@pytest.mark.parametrize("text, field", [
    ("name = 'x'\nos = 'iOS'\nsoc = 's'\n[sources]\ndram = 'x'\n", "dram_gb"),
    (GOOD.replace("dram_gb = 4", 'dram_gb = "six"'), "dram_gb"),
    (GOOD.replace("dram_gb = 4", "dram_gb = -4"), "dram_gb"),
    (GOOD.replace('aliases = ["tp-1"]', 'aliases = "tp-1"'), "aliases"),
    (GOOD.replace("reserved_gb = 1", "reserved_gb = 9"), "os_limit.reserved_gb"),
    (GOOD.replace("reserved_gb = 1", "app_limit_gb = 40"), "os_limit.app_limit_gb"),
    (GOOD.replace("[sources]\ndram = \"spec sheet\"", "[sources]\nsoc = 'x'"), "sources.dram"),
    ("colour = 'red'\n" + GOOD, "colour"),
])
def test_malformed_profile_names_file_and_field(tmp_path, text: str, field: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ProfileError) as e:
        load_profile_file(f)
    msg = str(e.value)
    assert msg.startswith(str(f)) and f"field {field}:" in msg and "\n" not in msg


def test_invalid_toml_and_missing_file(tmp_path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text('name = "x\ndram_gb = 4\n')
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML \(.*line 1"):
        resolve_device(str(f))
    with pytest.raises(ProfileError, match="no such profile file"):
        resolve_device(str(tmp_path / "absent.toml"))


def test_devices_cli_json_and_error(capsys, tmp_path) -> None:
    assert main(["devices", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["devices"]) == len(builtin_profiles())
    ip = next(d for d in out["devices"] if d["id"] == "iphone-15")
    assert ip["budget_bytes"] == 600_000_000 and ip["sources"]["dram"]
    assert main(["devices", "--device", "iphone-15", "--budget-fraction", "0.2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"][0]["budget_bytes"] == 1_200_000_000
    assert main(["devices", "--device", "iphone-99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phonekit devices: error: --device 'iphone-99': unknown device") and "\n" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("dram_gb = [")
    assert main(["devices", "--device", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["devices", "--budget-fraction", "1.5"]) == 2
    assert "--budget-fraction 1.5" in capsys.readouterr().err
