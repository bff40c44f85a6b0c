"""The sample apps (android_app/, ios_app/) cannot be built here: this suite checks what can
be checked without Android Studio or Xcode.

* every .kt/.kts/.swift file parses with no ERROR or MISSING node (tree-sitter grammars);
* each app's manifest types, read from the sources, mirror phonekit/schemas/bundle-1.schema.json
  (every field, its JSON name, type and nullability), so the contract cannot drift;
* manifests that phonekit really writes (a tiny model exported through the CLI, and bundles
  with every format and a budget) decode under each app's types, with the strictness of
  kotlinx.serialization and Swift's JSONDecoder;
* the apps verify the same files with the same hex form of sha256 that phonekit writes;
* identifiers, versions and defaults shared with phonekit (package name, runtime versions,
  budget fraction) agree across the apps, `phonekit push` and pyproject.toml.
"""

from __future__ import annotations

import copy
import json
import plistlib
import re
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import tree_sitter as ts
import tree_sitter_kotlin
import tree_sitter_swift
import yaml

from conftest import make_tiny_lm, write_hf_checkpoint
from phonekit.export.bundle import read_manifest, schema
from phonekit.export.commands import push
from test_push import write_bundle

# One worker runs this module, so the tiny-model export in `written_bundles` happens once.
pytestmark = pytest.mark.xdist_group("apps")

REPO = Path(__file__).resolve().parents[1]
ANDROID = REPO / "android_app"
IOS = REPO / "ios_app"
KOTLIN = ts.Language(tree_sitter_kotlin.language())
SWIFT = ts.Language(tree_sitter_swift.language())
KT_MANIFEST = ANDROID / "app/src/main/java/dev/phonekit/sample/bundle/BundleManifest.kt"
KT_FILES = ANDROID / "app/src/main/java/dev/phonekit/sample/bundle/BundleFiles.kt"
SW_MANIFEST = IOS / "PhonekitChat/Bundle/BundleManifest.swift"
SW_FILES = IOS / "PhonekitChat/Bundle/BundleFiles.swift"


def _sources(root: Path, *suffixes: str) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file())


def _parse(path_or_text: Path | bytes, lang: ts.Language) -> ts.Tree:
    data = path_or_text.read_bytes() if isinstance(path_or_text, Path) else path_or_text
    return ts.Parser(lang).parse(data)


def _syntax_errors(tree: ts.Tree) -> list[str]:
    found: list[str] = []

    def walk(n: ts.Node) -> None:
        if n.type == "ERROR" or n.is_missing:
            found.append(f"{'MISSING ' + n.type if n.is_missing else 'ERROR'} at line {n.start_point[0] + 1}: {n.text[:60]!r}")
        for c in n.children:
            walk(c)

    walk(tree.root_node)
    return found


# ------------------------------------------------------------------ every source parses

KOTLIN_SOURCES = _sources(ANDROID, ".kt", ".kts")
SWIFT_SOURCES = _sources(IOS, ".swift")


def test_the_apps_have_their_sources() -> None:
    assert len(KOTLIN_SOURCES) >= 10 and len(SWIFT_SOURCES) >= 10
    assert KT_MANIFEST in KOTLIN_SOURCES and SW_MANIFEST in SWIFT_SOURCES


@pytest.mark.parametrize("path", KOTLIN_SOURCES + SWIFT_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_source_parses_without_errors(path: Path) -> None:
    tree = _parse(path, KOTLIN if path.suffix in (".kt", ".kts") else SWIFT)
    assert _syntax_errors(tree) == []


def test_the_parse_check_catches_broken_code() -> None:
    """The grammars do flag broken code, so a clean parse above means something."""
    assert _syntax_errors(_parse(b"fun f( { val x = }\n", KOTLIN))
    assert _syntax_errors(_parse(b"struct S { let x: = }\nfunc f( {\n", SWIFT))


# ------------------------------------------------------------------ the manifest types, read from source

@dataclass(frozen=True)
class TypeRef:
    """A field type in a common vocabulary: string, int64, int32, double, bool, list, map,
    json-object (any JSON object), json-any (any JSON value), or a class name."""

    kind: str
    args: tuple["TypeRef", ...] = ()
    nullable: bool = False


@dataclass(frozen=True)
class Field:
    prop: str
    json: str
    type: TypeRef
    has_default: bool


@dataclass
class AppTypes:
    lang: str  # "kotlin" | "swift"
    classes: dict[str, dict[str, Field]]  # class -> JSON key -> field

    def field(self, cls: str, key: str) -> Field | None:
        return self.classes.get(cls, {}).get(key)


KOTLIN_KINDS = {"String": "string", "Long": "int64", "Int": "int32", "Double": "double", "Float": "float",
                "Boolean": "bool", "List": "list", "Map": "map", "JsonObject": "json-object", "JsonElement": "json-any"}
SWIFT_KINDS = {"String": "string", "Int": "int64", "Int64": "int64", "Int32": "int32", "Double": "double",
               "Float": "float", "Bool": "bool", "JSONValue": "json-any"}


def _kotlin_type(n: ts.Node) -> TypeRef:
    if n.type == "nullable_type":
        return replace(_kotlin_type(n.named_children[0]), nullable=True)
    assert n.type == "user_type", n.type
    name = next(c for c in n.children if c.type == "identifier").text.decode()
    targs = next((c for c in n.children if c.type == "type_arguments"), None)
    args = tuple(_kotlin_type(p.named_children[0]) for p in targs.named_children) if targs else ()
    if name == "Map":  # a JSON object's keys are strings: keep the value type only
        args = args[1:]
    return TypeRef(KOTLIN_KINDS.get(name, name), args)


def kotlin_types(source: bytes) -> AppTypes:
    """Every @Serializable class: its constructor parameters, @SerialName keys, defaults."""
    classes: dict[str, dict[str, Field]] = {}

    def walk(n: ts.Node) -> None:
        if n.type == "class_declaration":
            ctor = next((c for c in n.children if c.type == "primary_constructor"), None)
            mods = next((c.text.decode() for c in n.children if c.type == "modifiers"), "")
            if ctor is not None and "@Serializable" in mods.split():
                name = n.child_by_field_name("name").text.decode()
                fields: dict[str, Field] = {}
                for p in ctor.named_children[0].named_children:
                    if p.type != "class_parameter":
                        continue
                    prop = next(c for c in p.children if c.type == "identifier").text.decode()
                    key = prop
                    for ann in (a for m in p.children if m.type == "modifiers" for a in m.named_children):
                        if ann.text.decode().startswith("@SerialName("):
                            key = re.search(r'"([^"]*)"', ann.text.decode()).group(1)
                    type_node = next(c for c in p.children if c.type in ("user_type", "nullable_type"))
                    has_default = any(c.type == "=" for c in p.children)
                    fields[key] = Field(prop, key, _kotlin_type(type_node), has_default)
                classes[name] = fields
        for c in n.children:
            walk(c)

    walk(_parse(source, KOTLIN).root_node)
    return AppTypes("kotlin", classes)


def _swift_type(n: ts.Node) -> TypeRef:
    if n.type == "optional_type":
        return replace(_swift_type(n.child_by_field_name("wrapped")), nullable=True)
    if n.type == "array_type":
        return TypeRef("list", (_swift_type(n.named_children[0]),))
    if n.type == "dictionary_type":
        key, value = n.named_children
        assert key.text == b"String", "JSON object keys are strings"
        return TypeRef("map", (_swift_type(value),))
    assert n.type == "user_type", n.type
    name = n.text.decode()
    return TypeRef(SWIFT_KINDS.get(name, name))


def snake_to_camel(key: str) -> str:
    """Foundation's JSONDecoder.KeyDecodingStrategy.convertFromSnakeCase."""
    stripped = key.strip("_")
    if not stripped or "_" not in stripped:
        return key
    lead = key[: len(key) - len(key.lstrip("_"))]
    trail = key[len(key.rstrip("_")):]
    words = [w for w in stripped.split("_") if w]
    return lead + words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:]) + trail


def swift_types(source: bytes, schema_keys: set[str]) -> AppTypes:
    """Every struct's stored instance properties. JSON keys reach them through
    convertFromSnakeCase, so each property is filed under the schema key that maps onto it
    (or its own name when none does)."""
    by_camel = {snake_to_camel(k): k for k in schema_keys}
    classes: dict[str, dict[str, Field]] = {}

    def walk(n: ts.Node) -> None:
        if n.type == "class_declaration" and n.child_by_field_name("declaration_kind").text == b"struct":
            name = n.child_by_field_name("name").text.decode()
            fields: dict[str, Field] = {}
            for p in n.child_by_field_name("body").named_children:
                if p.type != "property_declaration":
                    continue
                mods = next((c.text.decode() for c in p.children if c.type == "modifiers"), "")
                if "static" in mods.split() or any(c.type == "computed_property" for c in p.children):
                    continue
                prop = p.child_by_field_name("name").text.decode()
                ann = next(c for c in p.children if c.type == "type_annotation")
                key = by_camel.get(prop, prop)
                fields[key] = Field(prop, key, _swift_type(ann.named_children[0]), p.child_by_field_name("value") is not None)
            classes[name] = fields
        for c in n.children:
            walk(c)

    walk(_parse(source, SWIFT).root_node)
    return AppTypes("swift", classes)


def _schema_keys(node: Any) -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        keys |= set(node.get("properties", {}))
        for v in node.values():
            keys |= _schema_keys(v)
    elif isinstance(node, list):
        for v in node:
            keys |= _schema_keys(v)
    return keys


SCHEMA = schema()
# Keys of free-form objects the apps type partly (artifact details) are JSON names too.
EXTRA_KEYS = {"onnxruntime_genai"}


def app_types(lang: str, kotlin_source: bytes | None = None, swift_source: bytes | None = None) -> AppTypes:
    if lang == "kotlin":
        return kotlin_types(kotlin_source if kotlin_source is not None else KT_MANIFEST.read_bytes())
    return swift_types(swift_source if swift_source is not None else SW_MANIFEST.read_bytes(), _schema_keys(SCHEMA) | EXTRA_KEYS)


# ------------------------------------------------------------------ contract: schema -> app types

def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        assert ref.startswith("#/$defs/")
        return SCHEMA["$defs"][ref.split("/")[-1]]
    return node


def _json_types(node: dict[str, Any]) -> set[str]:
    node = _resolve(node)
    if "const" in node or ("enum" in node and all(isinstance(v, str) for v in node["enum"])):
        return {"string"}
    t = node.get("type")
    return set(t) if isinstance(t, list) else {t} if t else set()


def contract_problems(types: AppTypes, root: str = "BundleManifest") -> list[str]:
    """What in `types` fails to mirror the schema: missing fields, wrong types, wrong nullability."""
    problems: list[str] = []

    def check_object(node: dict[str, Any], cls: str, path: str) -> None:
        if cls not in types.classes:
            problems.append(f"{path}: type {cls} not found")
            return
        required = set(node.get("required", []))
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}"
            f = types.field(cls, key)
            if f is None:
                problems.append(f"{where}: no field in {cls}")
                continue
            may_be_null = "null" in _json_types(sub)
            optional = key not in required
            if types.lang == "swift":
                if f.type.nullable != (optional or may_be_null):
                    problems.append(f"{where}: {cls}.{f.prop} must be {'Optional' if optional or may_be_null else 'non-optional'}")
                if f.has_default:
                    problems.append(f"{where}: {cls}.{f.prop} has a default, which Decodable ignores")
            else:
                if may_be_null and not f.type.nullable:
                    problems.append(f"{where}: {cls}.{f.prop} must be nullable (the schema allows null)")
                if not optional and not may_be_null and f.type.nullable:
                    problems.append(f"{where}: {cls}.{f.prop} must not be nullable (required, never null)")
                if optional and not f.has_default:
                    problems.append(f"{where}: {cls}.{f.prop} needs a default (the schema does not require it)")
                if not optional and f.has_default:
                    problems.append(f"{where}: {cls}.{f.prop} must have no default (the schema requires it)")
            check_value(sub, replace(f.type, nullable=False), where)

    def check_value(sub: dict[str, Any], t: TypeRef, where: str) -> None:
        node = _resolve(sub)
        kinds = _json_types(node) - {"null"}
        if len(kinds) != 1:
            problems.append(f"{where}: schema type {sorted(kinds)} is not one JSON type")
            return
        kind = kinds.pop()
        expect = {"string": "string", "integer": "int64", "number": "double", "boolean": "bool"}.get(kind)
        if expect is not None:
            if t.kind != expect:
                problems.append(f"{where}: {t.kind} for JSON {kind}; use {expect}")
        elif kind == "array":
            if t.kind != "list":
                problems.append(f"{where}: {t.kind} for a JSON array")
            else:
                check_value(node.get("items", {}), t.args[0], where + "[]")
        elif kind == "object":
            if "properties" in node:
                if t.kind in ("json-object", "json-any", "map"):
                    problems.append(f"{where}: untyped {t.kind} for an object the schema describes")
                else:
                    check_object(node, t.kind, where)
            elif t.kind in ("string", "int64", "int32", "double", "float", "bool", "list"):
                problems.append(f"{where}: {t.kind} for a JSON object")

    check_object(SCHEMA, root, "manifest")
    return problems


@pytest.mark.parametrize("lang", ["kotlin", "swift"])
def test_manifest_types_mirror_the_schema(lang: str) -> None:
    types = app_types(lang)
    assert contract_problems(types) == []
    # Every required field of every object the apps read is there, recursively: spot-check depth.
    art = types.field("BundleManifest", "artifacts").type.args[0].kind
    entry = types.field(art, "files").type.args[0].kind
    assert {"path", "bytes", "sha256"} <= set(types.classes[entry])
    verdict = types.field(types.field("BundleManifest", "budget").type.kind, "verdicts").type.args[0].kind
    assert set(_resolve(SCHEMA["properties"]["budget"]["properties"]["verdicts"]["items"])["required"]) <= set(types.classes[verdict])


def _kotlin_with(old: str, new: str) -> bytes:
    src = KT_MANIFEST.read_text()
    assert old in src
    return src.replace(old, new, 1).encode()


def _swift_with(old: str, new: str) -> bytes:
    src = SW_MANIFEST.read_text()
    assert old in src
    return src.replace(old, new, 1).encode()


@pytest.mark.parametrize("lang, old, new, expected", [
    ("kotlin", "    val sha256: String,\n)", "    val checksum: String,\n)", "manifest.tokenizer.files[].sha256: no field in FileEntry"),
    ("kotlin", "    val budget: Budget?,", "    val budget: Budget,", "manifest.budget: BundleManifest.budget must be nullable"),
    ("kotlin", '@SerialName("eos_ids") val eosIds: List<Long>', '@SerialName("eos_ids") val eosIds: List<Int>',
     "manifest.tokenizer.eos_ids[]: int32 for JSON integer; use int64"),
    ("kotlin", '@SerialName("hub_id") val hubId: String? = null', '@SerialName("hub_id") val hubId: String?',
     "manifest.model.hub_id: ModelInfo.hubId needs a default"),
    ("swift", "    let fits: Bool\n", "    let fits: Bool?\n", "manifest.budget.verdicts[].fits: Verdict.fits must be non-optional"),
    ("swift", "    let contextLength: Int\n", "    let contextLength: String\n", "manifest.context_length: string for JSON integer; use int64"),
    ("swift", "    let keptFloat: [String]\n", "    let keptFloats: [String]\n", "manifest.quantization.kept_float: no field in Quantization"),
])
def test_the_contract_check_catches_drift(lang: str, old: str, new: str, expected: str) -> None:
    """Edit one field in a copy of the source: the check names exactly that field."""
    types = app_types("kotlin", kotlin_source=_kotlin_with(old, new)) if lang == "kotlin" else \
        app_types("swift", swift_source=_swift_with(old, new))
    problems = contract_problems(types)
    # One problem, or the same one wherever the edited type is used (FileEntry: tokenizer and artifacts).
    field = expected.split(":")[0].rsplit(".", 1)[-1]
    assert problems and problems[0].startswith(expected), problems
    assert all(p.split(":")[0].endswith("." + field) for p in problems), problems


def test_decoders_are_configured_for_the_schema() -> None:
    kt = KT_MANIFEST.read_text()
    # phonekit adds facts (details, notes) without a schema bump: unknown keys must be skipped.
    assert re.search(r"Json\s*\{[^}]*ignoreUnknownKeys\s*=\s*true", kt)
    assert '"phonekit.bundle/1"' in kt and kt.count("data class ") == len(kotlin_types(kt.encode()).classes)
    sw = SW_MANIFEST.read_text()
    assert "decoder.keyDecodingStrategy = .convertFromSnakeCase" in sw and '"phonekit.bundle/1"' in sw
    assert "CodingKeys" not in sw  # keys come from convertFromSnakeCase alone, as the check above assumes
    assert SCHEMA["$id"] == "phonekit.bundle/1"


# ------------------------------------------------------------------ real manifests decode under the app types

def decode_problems(types: AppTypes, manifest: dict[str, Any]) -> list[str]:
    """What kotlinx.serialization (ignoreUnknownKeys) or JSONDecoder (convertFromSnakeCase)
    would reject in `manifest`, decoding it into `types`."""
    problems: list[str] = []

    def obj(value: Any, cls: str, where: str) -> None:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object for {cls}")
            return
        for key, f in types.classes[cls].items():
            if key not in value:
                if (types.lang == "kotlin" and not f.has_default) or (types.lang == "swift" and not f.type.nullable):
                    problems.append(f"{where}.{key}: missing, and {cls}.{f.prop} is required")
                continue
            val(value[key], f.type, f"{where}.{key}")

    def val(v: Any, t: TypeRef, where: str) -> None:
        if v is None:
            if not t.nullable and t.kind != "json-any":  # JSONValue has a .null case
                problems.append(f"{where}: null for a non-nullable {t.kind}")
            return
        ok = {
            "string": lambda: isinstance(v, str),
            "int64": lambda: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63,
            "int32": lambda: isinstance(v, int) and not isinstance(v, bool) and -2**31 <= v < 2**31,
            "double": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
            "float": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda: isinstance(v, bool),
            "json-object": lambda: isinstance(v, dict),
            "json-any": lambda: True,
        }.get(t.kind)
        if ok is not None:
            if not ok():
                problems.append(f"{where}: {type(v).__name__} {v!r:.40} does not decode as {t.kind}")
        elif t.kind == "list":
            if not isinstance(v, list):
                problems.append(f"{where}: expected an array")
            else:
                for i, item in enumerate(v):
                    val(item, t.args[0], f"{where}[{i}]")
        elif t.kind == "map":
            if not isinstance(v, dict):
                problems.append(f"{where}: expected an object")
            else:
                for k, item in v.items():
                    val(item, t.args[0], f"{where}.{k}")
        else:
            obj(v, t.kind, where)

    obj(manifest, "BundleManifest", "manifest")
    return problems


BUDGET = {
    "budget_fraction": 0.1,
    "allow_over_budget": True,
    "verdicts": [
        {"device": "pixel-8", "format": "pte", "dram_bytes": 8_000_000_000, "budget_bytes": 800_000_000,
         "estimate_bytes": 3_100_000_000, "headroom_bytes": -2_300_000_000, "fits": False, "fits_os_limit": None},
        {"device": "iphone-15", "format": "coreml", "dram_bytes": 6_000_000_000, "budget_bytes": 600_000_000,
         "estimate_bytes": 210_000_000, "headroom_bytes": 390_000_000, "fits": True, "fits_os_limit": True},
    ],
}


@pytest.fixture(scope="module")
def written_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles as phonekit writes them: a real CLI export of a tiny model (every format, with
    the budget gate's verdicts for two phones), and manifests with a budget over 2 GB and a
    PLM onnx artifact that onnxruntime-genai cannot run."""
    from phonekit.export.cli import main

    tmp = tmp_path_factory.mktemp("apps")
    ckpt = write_hf_checkpoint(make_tiny_lm("mobilellm"), tmp / "ckpt")
    out = tmp / "exported"
    rc = main(["export", str(ckpt), "--target", "all", "--quant", "fp32", "--context", "64",
               "--device", "pixel-8", "--device", "iphone-15", "--out", str(out), "--quiet"])
    assert rc == 0
    return {
        "exported": out,
        "all-formats": write_bundle(tmp / "all", ("pte", "onnx", "coreml"), budget=BUDGET),
        "plm-onnx": write_bundle(tmp / "plm", ("onnx", "pte"), family="plm"),
    }


@pytest.mark.parametrize("lang", ["kotlin", "swift"])
def test_manifests_phonekit_writes_decode_in_the_apps(written_bundles: dict[str, Path], lang: str) -> None:
    types = app_types(lang)
    for name, bundle in written_bundles.items():
        manifest = read_manifest(bundle)
        assert decode_problems(types, manifest) == [], name
    exported = read_manifest(written_bundles["exported"])
    assert [a["format"] for a in exported["artifacts"]] == ["pte", "onnx", "coreml"]
    assert {(v["device"], v["format"]) for v in exported["budget"]["verdicts"]} == {
        (d, f) for d in ("pixel-8", "iphone-15") for f in ("pte", "onnx", "coreml")}
    assert exported["model"]["hub_id"] is None and exported["tokenizer"]["chat_template"] is None  # nulls really occur


def test_the_decode_check_catches_what_the_apps_would_reject(written_bundles: dict[str, Path]) -> None:
    manifest = read_manifest(written_bundles["all-formats"])
    kt, sw = app_types("kotlin"), app_types("swift")
    bad = copy.deepcopy(manifest)
    del bad["artifacts"][0]["sha256"]
    bad["budget"]["verdicts"][0]["fits"] = None
    bad["context_length"] = "64"
    for types in (kt, sw):
        assert decode_problems(types, bad) == [
            "manifest.context_length: str '64' does not decode as int64",
            "manifest.artifacts[0].sha256: missing, and Artifact.sha256 is required",
            "manifest.budget.verdicts[0].fits: null for a non-nullable bool",
        ]
    # The ONNX exporter's genai flag is what the Android app reads to pick onnxruntime-genai.
    onnx = next(a for a in read_manifest(written_bundles["exported"])["artifacts"] if a["format"] == "onnx")
    assert onnx["details"]["onnxruntime_genai"]["compatible"] is True
    plm = next(a for a in read_manifest(written_bundles["plm-onnx"])["artifacts"] if a["format"] == "onnx")
    assert plm["details"]["onnxruntime_genai"] == {"compatible": False, "reason": plm["details"]["onnxruntime_genai"]["reason"]}
    genai = kt.field("ArtifactDetails", "onnxruntime_genai").type.kind
    assert {"compatible", "reason"} == set(kt.classes[genai])


# ------------------------------------------------------------------ the engines fit what the exporters write

def test_ios_core_ml_engine_feeds_what_the_exported_model_declares(written_bundles: dict[str, Path]) -> None:
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2 as ft

    src = (IOS / "PhonekitChat/Engines/CoreMLEngine.swift").read_text()
    names = {k: re.search(rf'static let {k} = "(\w+)"', src).group(1) for k in ("inputName", "maskName", "outputName")}
    bundle = written_bundles["exported"]
    art = next(a for a in read_manifest(bundle)["artifacts"] if a["format"] == "coreml")
    spec = ct.models.MLModel(str(bundle / art["file"]), skip_model_load=True).get_spec()
    inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
    # The app refuses models with inputs it does not feed, and needs the token input.
    assert set(inputs) == {names["inputName"], names["maskName"]}
    assert names["outputName"] in {o.name for o in spec.description.output}
    assert len(spec.description.state) == 2  # the KV cache is MLState, which makeState() creates
    ids = inputs[names["inputName"]]
    assert ids.dataType == ft.ArrayFeatureType.INT32 and "dataType: .int32" in src
    # One function for prefill and decode: q ranges from 1 (decode) up to the context.
    q = ids.shapeRange.sizeRanges[1]
    assert (q.lowerBound, q.upperBound) == (1, 64) and ids.WhichOneof("ShapeFlexibility") == "shapeRange"
    assert inputs[names["maskName"]].dataType in (ft.ArrayFeatureType.FLOAT16, ft.ArrayFeatureType.FLOAT32)
    assert "maskType == .float16" in src


def test_android_engines_open_what_the_exporters_write(written_bundles: dict[str, Path]) -> None:
    bundle = written_bundles["exported"]
    manifest = read_manifest(bundle)
    onnx = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    # GenAiEngine opens the folder that holds artifact.file; genai reads its config and tokenizer there.
    folder = (bundle / onnx["file"]).parent
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == Path(onnx["file"]).name
    assert (folder / "tokenizer.json").is_file() and "genai_config.json" in {f["path"] for f in onnx["files"]}
    src = (ANDROID / "app/src/main/java/dev/phonekit/sample/engine/GenAiEngine.kt").read_text()
    assert "resolveInBundle(dir, artifact.file).parentFile" in src
    # ExecuTorchEngine passes seqLen = context_length; the runner must not see a shorter max_seq_len.
    pte = next(a for a in manifest["artifacts"] if a["format"] == "pte")
    assert pte["details"]["runner_metadata"]["get_max_seq_len"] == manifest["context_length"]
    assert ".seqLen(manifest.contextLength.toInt())" in (ANDROID / "app/src/main/java/dev/phonekit/sample/engine/ExecuTorchEngine.kt").read_text()


# ------------------------------------------------------------------ sha256 verification

def _function(tree: ts.Tree, name: str) -> str:
    def walk(n: ts.Node) -> str | None:
        if n.type == "function_declaration":
            ident = n.child_by_field_name("name") or next((c for c in n.children if c.type in ("identifier", "simple_identifier")), None)
            if ident is not None and ident.text.decode() == name:
                return n.text.decode()
        for c in n.children:
            found = walk(c)
            if found:
                return found
        return None

    found = walk(tree.root_node)
    assert found, f"function {name} not found"
    return found


@pytest.mark.parametrize("lang", ["kotlin", "swift"])
def test_apps_verify_the_files_phonekit_lists_with_the_same_hex(written_bundles: dict[str, Path], lang: str) -> None:
    import hashlib

    path, grammar = (KT_FILES, KOTLIN) if lang == "kotlin" else (SW_FILES, SWIFT)
    tree = _parse(path, grammar)
    listed = _function(tree, "filesToVerify")
    assert re.search(r"manifest\.tokenizer\.files\s*\+\s*artifact\.files", listed)
    verify = _function(tree, "verifyBundle")
    assert "filesToVerify(" in verify and "resolveInBundle(" in verify and "hex(" in verify
    assert ('MessageDigest.getInstance("SHA-256")' if lang == "kotlin" else "SHA256()") in verify
    assert re.search(r"\.bytes\b", verify) and re.search(r"\.sha256\b", verify)
    fmt = re.findall(r'"(%[^"]*)"', _function(tree, "hex"))
    assert len(fmt) == 1
    # The app's per-byte format, applied to real files, must give the manifest's sha256.
    for bundle in written_bundles.values():
        manifest = read_manifest(bundle)
        for art in manifest["artifacts"]:
            for entry in manifest["tokenizer"]["files"] + art["files"]:
                digest = hashlib.sha256((bundle / entry["path"]).read_bytes()).digest()
                assert "".join(fmt[0] % b for b in digest) == entry["sha256"]
    # Paths that leave the bundle folder are refused before any file is opened.
    resolve = _function(tree, "resolveInBundle")
    assert '".."' in resolve and '"/"' in resolve


# ------------------------------------------------------------------ memory budget and chat format

def test_memory_checks_read_the_platform_numbers_and_phonekits_default_budget() -> None:
    from phonekit.export.cli import build_parser

    kt = (ANDROID / "app/src/main/java/dev/phonekit/sample/bundle/MemoryBudget.kt").read_text()
    sw = (IOS / "PhonekitChat/Bundle/MemoryBudget.swift").read_text()
    assert "ActivityManager.MemoryInfo()" in kt and all(f"info.{f}" in kt for f in ("totalMem", "availMem", "threshold"))
    assert "os_proc_available_memory()" in sw and "ProcessInfo.processInfo.physicalMemory" in sw
    default = build_parser().parse_args(["export", "any-model", "--target", "android", "--out", "x"]).budget_fraction
    assert float(re.search(r"DEFAULT_BUDGET_FRACTION = ([0-9.]+)", kt).group(1)) == default
    assert float(re.search(r"let defaultBudgetFraction = ([0-9.]+)", sw).group(1)) == default
    # Both judge the estimate of the artifact's own format, and refuse what the phone cannot give.
    assert "it.format == artifact.format" in kt and "$0.format == artifact.format" in sw
    assert "Fit.OVER_AVAILABLE" in kt and ".overAvailable" in sw


def test_android_chat_format_matches_the_demo_template() -> None:
    """Android renders ChatML without Jinja; its default-system regex must find SmolLM2's."""
    from phonekit.export.loaders import gguf_file
    from phonekit.export.loading import demo_gguf_path
    from phonekit.export.tokenizer import Tokenizer

    src = (ANDROID / "app/src/main/java/dev/phonekit/sample/engine/ChatEngine.kt").read_text()
    pattern = re.search(r'DEFAULT_SYSTEM = Regex\("""(.*?)"""\)', src).group(1)
    # The demo's template as its GGUF stores it (what `phonekit export` writes into the manifest),
    # rendered by phonekit's own chat renderer; no need to convert the whole tokenizer.
    template = gguf_file.open_reader(demo_gguf_path()).fields["tokenizer.chat_template"].contents()
    tok = Tokenizer(None, "hf", None, [], False, template)
    system = re.search(pattern, tok.chat_template).group(1)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # The ChatML layout ChatFormat.render writes is what the template renders.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    chatml = f"<|im_start|>system\n{system}<|im_end|>\n" + "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"
    assert tok.apply_chat(messages) == chatml
    assert re.search(pattern, r"'<|im_start|>system\nYou are X.<|im_end|>\n'").group(1) == "You are X."  # escaped \n form
    assert re.search(pattern, "<|im_start|>system\n' + message['content'] + '<|im_end|>") is None


# ------------------------------------------------------------------ projects, identifiers, versions

def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps if "==" in d)


def test_android_project_is_pinned_and_consistent() -> None:
    catalog = tomllib.loads((ANDROID / "gradle/libs.versions.toml").read_text())
    versions = catalog["versions"]
    assert all(re.fullmatch(r"\d+(\.\d+)+", v) for v in versions.values()), versions
    pins = _pyproject_pins()
    assert versions["executorch"] == pins["executorch"]
    assert versions["onnxruntime"] == pins["onnxruntime"]
    assert versions["onnxruntimeGenai"] == pins["onnxruntime-genai"]
    aliases = {k.replace("-", ".") for k in catalog["libraries"]}
    plugins = {k.replace("-", ".") for k in catalog["plugins"]}
    for build in (ANDROID / "build.gradle.kts", ANDROID / "app/build.gradle.kts"):
        text = build.read_text()
        for used in re.findall(r"libs\.plugins\.([\w.]+)", text):
            assert used in plugins, (build, used)
        for used in re.findall(r"libs\.(?!plugins\.|versions\.)([\w.]+)", text):
            assert used in aliases, (build, used)
        for used in re.findall(r"libs\.versions\.([\w.]+)\.get\(\)", text):
            assert used in versions, (build, used)
    for ref in (v.get("version", {}) for v in list(catalog["libraries"].values()) + list(catalog["plugins"].values())):
        assert ref == {} or ref.get("ref") in versions
    wrapper = (ANDROID / "gradle/wrapper/gradle-wrapper.properties").read_text()
    assert re.search(r"distributionUrl=.*gradle-\d+\.\d+(\.\d+)?-bin\.zip", wrapper)
    app = (ANDROID / "app/build.gradle.kts").read_text()
    assert f'applicationId = "{push.ANDROID_PACKAGE}"' in app
    manifest = ET.parse(ANDROID / "app/src/main/AndroidManifest.xml").getroot()
    ns = "{http://schemas.android.com/apk/res/android}"
    activity = manifest.find("application/activity")
    assert activity.get(f"{ns}name") == ".MainActivity" and activity.get(f"{ns}exported") == "true"
    assert activity.find("intent-filter/category").get(f"{ns}name") == "android.intent.category.LAUNCHER"
    assert (ANDROID / "app/src/main/java/dev/phonekit/sample/MainActivity.kt").is_file()
    strings = ET.parse(ANDROID / "app/src/main/res/values/strings.xml").getroot()
    assert strings.find("string[@name='app_name']").text == push.IOS_APP_NAME


def test_ios_project_is_pinned_and_consistent() -> None:
    spec = yaml.safe_load((IOS / "project.yml").read_text())
    assert spec["options"]["deploymentTarget"]["iOS"] == "18.0"
    for name, package in spec["packages"].items():
        assert set(package) & {"exactVersion", "revision", "branch"}, name
    pins = _pyproject_pins()
    et = spec["packages"]["executorch"]
    major_minor = ".".join(pins["executorch"].split(".")[:2])
    assert re.fullmatch(rf"swiftpm-{re.escape(major_minor)}\.\d+", et["branch"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["packages"]["swift-transformers"]["exactVersion"])
    target = spec["targets"]["PhonekitChat"]
    settings = target["settings"]["base"]
    assert settings["PRODUCT_BUNDLE_IDENTIFIER"] == push.IOS_BUNDLE_ID
    assert "-all_load" in settings["OTHER_LDFLAGS"]
    products = {d["product"] for d in target["dependencies"]}
    assert {"executorch", "executorch_llm", "backend_xnnpack", "kernels_llm", "Tokenizers"} <= products
    entitlements = plistlib.loads((IOS / settings["CODE_SIGN_ENTITLEMENTS"]).read_bytes())
    assert entitlements == {"com.apple.developer.kernel.increased-memory-limit": True}
    info = plistlib.loads((IOS / settings["INFOPLIST_FILE"]).read_bytes())
    assert info["UIFileSharingEnabled"] is True and info["LSSupportsOpeningDocumentsInPlace"] is True
    assert info["CFBundleDisplayName"] == push.IOS_APP_NAME
    assert all((IOS / s["path"]).is_dir() for s in target["sources"])


@pytest.mark.parametrize("app", [ANDROID, IOS], ids=["android", "ios"])
def test_readme_says_how_to_build_and_what_ci_cannot_do(app: Path) -> None:
    text = (app / "README.md").read_text()
    for heading in ("## Requirements", "## Build", "## Load a bundle", "## What it shows", "## Known limits"):
        assert heading in text, heading
    assert "cannot build" in text and ("Android Studio" in text if app == ANDROID else "Xcode" in text)
    assert "phonekit push " + ("android" if app == ANDROID else "ios") in text
