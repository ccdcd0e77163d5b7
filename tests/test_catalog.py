"""The device catalog: families with a default member, aliases, sources; old target names and hashes unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edgeopt import targets as T
from edgeopt.cli import main
from edgeopt.errors import TargetFileError, UnknownTargetError
from edgeopt.targets import (
    alias_names,
    builtin_names,
    catalog,
    default_names,
    family_names,
    load_target,
    load_targets,
    target_sha256,
)

ROOT = Path(__file__).resolve().parents[1]

#: target_sha256 of the ten targets that existed before the catalog, computed at the commit before it: plans saved
#: then must still replay (pipeline.check_replay compares this hash).  A deliberate change to one of these targets'
#: numbers changes its hash: update the value here in the same commit.
OLD_HASHES = {
    "android-mid": "9fafac8d03295ff75c93b59aa44a5f7953b5ccc41c85f16c1dbf99e41fedf1c8",
    "arm64-rpi5": "98aad2bbabe12ee155a064952f3c6d1ce471e244baa21df96b46ae4ca5177565",
    "arm64-server": "7d4eb99e0937258ab6edf85e4bcfe06613a908faa14ad4d7bbfc70170896cfb3",
    "gpu-server": "97e5daba70eb5e2a532dcec8b52c6d8db17b7b8cdaa5d8eaf0a781d32d7818e2",
    "ios": "19b44be0354dda9049f664aae77799dea34450d1ac0338e2018345ec1154e826",
    "jetson-orin": "cf18798c5173c1341bf1dfc6019ebdc2becc9319955c57472f3eccd54b66b236",
    "mcu-cortex-m7": "5d601751c855bdf4184f8702b58fbcb5181c8db2fa939c4fef1ec9f4bb183993",
    "x86-avx2": "5360bdfbe5bc53ae342cdf6790ed4f443f3ee8544655416d86c4a9f5fa0c7191",
    "x86-avx512-vnni": "9efaf5ddbd1e63006111419df8c3f3c2c4d94d3eec79606af5a34511d9359f2e",
    "x86-cpu": "4d0c07ad5853e699f9bae7fe869fff9decdfbea96e232bbc89440ae18fea31cb",
}


def _families_yaml() -> dict:
    return yaml.safe_load((T.BUILTIN_DIR / "_families.yaml").read_text())


def test_old_names_resolve_to_the_same_definition_and_hash():
    for name, digest in OLD_HASHES.items():
        t = load_target(name)
        assert t.name == name
        assert target_sha256(t) == digest, f"{name}: its hash changed, so plans saved for it no longer replay"


def test_at_least_15_devices_in_the_required_families():
    devices = builtin_names()
    assert len(devices) >= 15
    c = catalog()
    assert {"jetson", "gpu-server", "android", "ios", "mcu", "x86-cpu", "arm64-cpu"} <= set(c.families)
    members = {f: set(fam.members) for f, fam in c.families.items()}
    assert {"jetson-orin-nano", "jetson-orin-nx", "jetson-orin"} <= members["jetson"]
    assert {"gpu-t4", "gpu-l4", "gpu-a100", "gpu-server"} <= members["gpu-server"]
    assert {"mcu-cortex-m4f", "mcu-cortex-m7", "mcu-cortex-m55"} <= members["mcu"]
    assert {"android-mid", "android-high"} <= members["android"]
    assert {"ios", "ios-a15", "ios-a16"} <= members["ios"]
    # every device in exactly one family, every family's members of one device class
    assert sorted(d for fam in c.families.values() for d in fam.members) == devices
    for fam in c.families.values():
        assert len({load_target(d).device_class for d in fam.members}) == 1, fam.name


@pytest.mark.parametrize("name", builtin_names())
def test_every_device_loads_with_its_family_and_sources(name):
    t = load_target(name)
    assert t.name == name and t.family == catalog().family_of[name]
    assert t.sources and all(len(s) >= 20 for s in t.sources), f"{name}: cite where the numbers come from"
    text = (T.BUILTIN_DIR / f"{name}.yaml").read_text()
    assert "# Source" in text or "Sources:" in text, f"{name}: the file's comments name the sources too"
    for opt in t.backends:  # every precision a backend lists has a peak rate on its unit
        unit = t.compute_units[opt.unit]
        assert all(unit.peak_ops_per_s[opt.compute_precision(p)] > 0 for p in opt.precisions)


def test_family_names_resolve_to_the_declared_default():
    declared = _families_yaml()
    assert family_names() == sorted(declared)
    for fam, spec in declared.items():
        assert load_target(fam).name == spec["default"]
        assert catalog().families[fam].members[0] == spec["default"]  # the default is listed first
    assert load_target("jetson").name == "jetson-orin"
    assert load_target("x86").name == load_target("x86-cpu").name == "x86-cpu"
    assert load_target("arm64").name == "arm64-rpi5"
    assert default_names() == sorted(spec["default"] for spec in declared.values())


@pytest.mark.parametrize("alias,device", [
    ("orin-nano", "jetson-orin-nano"), ("orin-nx", "jetson-orin-nx"), ("agx-orin", "jetson-orin"),
    ("a100", "gpu-a100"), ("h100", "gpu-server"), ("t4", "gpu-t4"), ("l4", "gpu-l4"),
    ("iphone-15", "ios-a16"), ("iphone-15-pro", "ios"), ("iphone-14", "ios-a15"),
    ("stm32h7", "mcu-cortex-m7"), ("nrf52840", "mcu-cortex-m4f"), ("ethos-u55", "mcu-cortex-m55"),
    ("rpi5", "arm64-rpi5"), ("graviton3", "arm64-server"), ("snapdragon-8-gen-3", "android-high"),
])
def test_aliases_load_the_device_itself(alias, device):
    t = load_target(alias)
    assert t.name == device and t == load_target(device) and target_sha256(t) == target_sha256(load_target(device))
    assert alias_names()[alias] == device and alias in t.aliases


def test_names_are_unambiguous_and_fleet_words_are_free():
    c = catalog()
    for fam in c.families.values():  # a family may share its name with a device only if that device is its default
        if fam.name in c.family_of:
            assert fam.default == fam.name
    assert not {"all", "every", "host"} & set(c.names)
    assert set(alias_names()).isdisjoint(builtin_names())


def test_sources_and_the_new_families_do_not_change_the_hash():
    t = load_target("jetson-orin")
    assert target_sha256(t.model_copy(update={"sources": ["elsewhere"], "aliases": []})) == target_sha256(t)
    assert target_sha256(t.model_copy(update={"family": "other"})) == target_sha256(t)
    faster = t.model_copy(update={"budgets": t.budgets.model_copy(update={"latency_ms": 10.0})})
    assert target_sha256(faster) != target_sha256(t)
    x86 = load_target("x86-cpu")  # x86-cpu/arm64-cpu had a hashed family before the catalog; it stays hashed
    assert target_sha256(x86.model_copy(update={"family": "arm64-cpu"})) != target_sha256(x86)


def test_user_files_start_from_an_alias_or_family_and_take_no_aliases(tmp_path):
    f = tmp_path / "nano-super.yaml"
    f.write_text("base: orin-nano\nname: orin-nano-super\n"
                 "compute_units: {gpu: {memory_bandwidth_bytes_per_s: 1.02e11}}\n")
    t = load_target(f)
    assert t.name == "orin-nano-super" and t.family == "jetson" and t.sources == load_target("orin-nano").sources
    assert t.compute_units["gpu"].memory_bandwidth_bytes_per_s == 1.02e11
    assert load_target(f).compute_units["gpu"].peak_ops_per_s == load_target("orin-nano").compute_units["gpu"].peak_ops_per_s
    f.write_text("base: mcu\nname: my-mcu\nbudgets: {ram: 128KiB}\n")
    assert load_target(f).budgets.storage == load_target("mcu-cortex-m7").budgets.storage
    assert load_target(f).aliases == []  # not inherited: the base's names are not this target's
    f.write_text("base: mcu-cortex-m7\nname: my-mcu\naliases: [mine]\n")
    assert load_target(f).aliases == ["mine"]  # recorded (a copied built-in file loads), but only the catalog resolves
    with pytest.raises(UnknownTargetError):
        load_target("mine")
    f.write_text("base: mcu-cortex-m7\nname: my-mcu\naliases: [Not A Name]\n")
    with pytest.raises(TargetFileError, match="aliases.0"):
        load_target(f)
    f.write_text("base: jetson-nano\nname: x\n")
    with pytest.raises(UnknownTargetError, match="base: unknown target 'jetson-nano'.*jetson-orin-nano"):
        load_target(f)


def test_targets_show_prints_the_sources(capsys):
    assert main(["targets", "show", "orin-nano"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("name: jetson-orin-nano\n") and "aliases:\n- orin-nano\n" in out
    for s in load_target("jetson-orin-nano").sources:
        assert s in out
    assert main(["targets", "show", "jetson"]) == 0
    assert capsys.readouterr().out.startswith("# jetson-orin: the default of family jetson (--target jetson)\n")
    assert main(["targets", "show", "gpu-t4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == load_target("t4").sources


def test_targets_list_groups_devices_by_family(capsys):
    assert main(["targets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in lines if ln.startswith("│")]
    family, seen = None, {}
    for cells in rows:
        family = cells[0].split(" ")[0] or family
        device = cells[1].removesuffix(" *")
        if device:
            seen[device] = (family, cells[1].endswith(" *"))
    c = catalog()
    assert seen == {d: (c.family_of[d], c.families[c.family_of[d]].default == d) for d in builtin_names()}
    assert [r[0].split(" ")[0] for r in rows if r[0]] == list(c.families)  # in _families.yaml's order

    assert main(["targets", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["family"] for g in data] == list(c.families)
    for g in data:
        assert [d["name"] for d in g["devices"]] == list(c.families[g["family"]].members)
        assert g["devices"][0]["name"] == g["default"]
        assert all(d["family"] == g["family"] and d["sources"] for d in g["devices"])
    assert next(d for g in data for d in g["devices"] if d["name"] == "jetson-orin-nano")["aliases"][0] == "orin-nano"

    assert main(["targets", "list", "--family", "jetson", "--json"]) == 0
    assert [d["name"] for g in json.loads(capsys.readouterr().out) for d in g["devices"]] == \
        ["jetson-orin", "jetson-orin-nano", "jetson-orin-nx"]
    assert main(["targets", "list", "--family", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown family 'nope'; families: gpu-server, jetson")


def test_unknown_name_is_one_line_listing_families_and_devices(capsys):
    assert main(["targets", "show", "jetson-nano"]) == 2  # the 2019 Maxwell board: not in the catalog
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown target 'jetson-nano'; ")
    assert "families: android, arm64-cpu, gpu-server, ios, jetson, mcu, x86-cpu; devices: android-high" in err
    assert all(d in err for d in builtin_names()) and "agx-orin" not in err and "iphone" not in err  # no aliases
    assert main(["targets", "show", "jetsn"]) == 2
    assert "did you mean 'jetson'?" in capsys.readouterr().err


@pytest.fixture
def scratch_catalog(tmp_path, monkeypatch):
    """A copy of the built-in target files to break, with the catalog's caches reset around the test."""
    d = tmp_path / "targets"
    shutil.copytree(T.BUILTIN_DIR, d)
    monkeypatch.setattr(T, "BUILTIN_DIR", d)
    monkeypatch.setattr(T, "FAMILIES_FILE", d / "_families.yaml")
    T.catalog.cache_clear()
    T._load_builtin.cache_clear()
    yield d
    T.catalog.cache_clear()
    T._load_builtin.cache_clear()


def test_catalog_rejects_ambiguous_or_dangling_declarations(scratch_catalog):
    d = scratch_catalog
    assert len(T.builtin_names()) == len(OLD_HASHES) + 10  # the copy reads as the original
    m4 = d / "mcu-cortex-m4f.yaml"
    original = m4.read_text()
    m4.write_text(original.replace("aliases: [nrf52840,", "aliases: [stm32h7,"))
    T.catalog.cache_clear()
    with pytest.raises(TargetFileError, match=r"'stm32h7' \(alias of mcu-cortex-m\d+f?\) already stands for mcu-cortex-m"):
        T.catalog()
    m4.write_text(original.replace("aliases: [nrf52840,", "aliases: [jetson,"))
    T.catalog.cache_clear()
    with pytest.raises(TargetFileError, match="'jetson' .*already stands for"):
        T.catalog()
    m4.write_text(original.replace("family: mcu", "family: mcus"))
    T.catalog.cache_clear()
    with pytest.raises(TargetFileError, match="mcu-cortex-m4f.yaml: family 'mcus' is not declared"):
        T.catalog()
    m4.write_text(original.replace("name: mcu-cortex-m4f", "base: stm32h7\nname: mcu-cortex-m4f"))
    T.catalog.cache_clear()
    with pytest.raises(TargetFileError, match="mcu-cortex-m4f.yaml: base: 'stm32h7' is not a device file's name"):
        T.catalog()
    m4.write_text(original)
    fams = d / "_families.yaml"
    fams.write_text(fams.read_text().replace("default: mcu-cortex-m7", "default: mcu-cortex-m3"))
    T.catalog.cache_clear()
    with pytest.raises(TargetFileError, match="mcu: default 'mcu-cortex-m3' is not a member"):
        T.load_target("mcu")


def test_load_targets_words():
    assert [t.name for t in load_targets("all")] == default_names()
    assert len(load_targets("all")) == len(family_names())
    assert [t.name for t in load_targets("every")] == builtin_names()


def test_readme_lists_every_family_and_device():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for name in [*builtin_names(), *family_names()]:
        assert f"`{name}`" in section, name
