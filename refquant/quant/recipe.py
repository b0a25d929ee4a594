"""Recipes: TOML files -> typed dataclasses -> which quantizer gets which format
(docs/modelopt_behaviour.md §7-8).

A recipe is data: an ordered list of rules (modelopt's `quant_cfg`). Each rule matches quantizers
by an fnmatch glob over their full dotted module name (optionally only under a parent class) and
either replaces the quantizer's whole config (`cfg`, which also enables it) or only flips it on or
off (`enable`). Rules apply in order, so a later match wins.

Files compose as modelopt's recipes do: a list item `{ import = "NAME" }` splices the rules of a
unit, and `cfg = { import = "NAME", key = value }` merges a numerics unit with inline keys that
win. A name is looked up as NAME.toml next to the importing file, then among the shipped units
(refquant/recipes/units/), then among the shipped recipes; importing a recipe splices its rules
and nothing else. docs/recipes.md describes the format; every mistake raises a ValueError naming
the file, the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

from dataclasses_json import DataClassJsonMixin, config
from torch import nn

from .quantizer import QuantizerConfig, TensorQuantizer, is_weight_quantizer, refuse_folded

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The shipped recipes and units are package data (refquant/recipes/), found through
# importlib.resources so that an installed wheel finds them as a checkout does. Imports are
# resolved by file path, so refquant must be installed as files (not imported from a zip).
RECIPES_DIR = Path(os.fspath(resources.files("refquant") / "recipes"))
UNITS_DIR = RECIPES_DIR / "units"

RECIPE_FORMATS = ("fp8", "nvfp4")  # what a recipe's cfg may name; "off" is `enable = false`
ALGORITHMS = {"max": "max", "none": None}  # TOML has no null: "none" means no calibration
QFORMAT_UNITS = {"fp8": "w8a8_fp8_fp8", "nvfp4": "w4a4_nvfp4_nvfp4"}
# --kv-cache-qformat -> the unit it appends ("none": no KV rule)
KV_CACHE_UNITS = {
    "fp8": "kv_fp8", "fp8_cast": "kv_fp8_cast", "nvfp4": "kv_nvfp4", "nvfp4_cast": "kv_nvfp4_cast", "none": None,
}
DEFAULT_KV_CACHE_QFORMAT = "fp8_cast"  # modelopt's hf_ptq default (docs/modelopt_behaviour.md §8.4)
KV_QUANTIZER_PATTERN = "*[kv]_bmm_quantizer"


# --------------------------------------------------------------------------------------------
# What the loader returns (the PTQ flow codes against these)
# --------------------------------------------------------------------------------------------


@dataclass
class QuantRule(DataClassJsonMixin):
    """One quant_cfg entry after imports are resolved (docs/modelopt_behaviour.md §7.1).

    quantizer_name: fnmatch glob over full dotted module names (`*` crosses dots).
    parent_class:   the quantizer's parent module must be an instance of torch.nn.<Name>,
                    written "nn.Linear", "nn.Embedding", "nn.BatchNorm1d", ...; None: any parent.
    cfg:            full replacement of the quantizer's config (every field not given returns
                    to its default); None for an enable-only rule.
    enable:         with cfg: whether the configured quantizer is on (None means True);
                    without cfg: flips the quantizer on or off and keeps everything else.
    origin:         where the rule was written ("units/kv_fp8_cast.toml quant_cfg[0]"), for
                    tables and error messages; not part of equality.
    """

    quantizer_name: str
    parent_class: Optional[str] = None
    cfg: Optional[QuantizerConfig] = None
    enable: Optional[bool] = None
    origin: str = field(default="", compare=False)


@dataclass
class Recipe(DataClassJsonMixin):
    """A resolved recipe: its rules in application order, no imports left."""

    name: str
    description: str
    algorithm: Optional[str]  # "max", or None (no calibration)
    quant_cfg: list[QuantRule]
    source: str  # the file it came from


@dataclass
class RecipeApplication:
    """What apply_recipe did: which quantizers each rule matched (by rule index, 0-based)."""

    recipe: Recipe
    matches: dict[int, list[str]]
    unmatched_rules: list[QuantRule]


# --------------------------------------------------------------------------------------------
# The file schema, as written (dataclasses-json), with the keys and types each table accepts
# --------------------------------------------------------------------------------------------

_STR = ((str,), "a string")
_BOOL = ((bool,), "true or false")
_TABLE = ((dict,), "a table, e.g. { import = \"numerics/fp8\" }")
_RULES = ((list,), "an array of tables ([[quant_cfg]] blocks)")
_AXIS = ((int, list), "an int or a list of ints")
_NAMES = ((str, list), "a unit name or a list of unit names")


@dataclass
class _RecipeFileSpec(DataClassJsonMixin):
    """Top level of a recipe or a rules unit. A unit carries no algorithm."""

    KEYS: ClassVar[dict] = {"description": _STR, "algorithm": _STR, "quant_cfg": _RULES}
    description: Optional[str] = None
    algorithm: Optional[str] = None
    quant_cfg: Optional[list] = None


@dataclass
class _CfgUnitSpec(DataClassJsonMixin):
    """Top level of a numerics unit: a cfg table other cfg tables import."""

    KEYS: ClassVar[dict] = {"description": _STR, "cfg": _TABLE}
    description: Optional[str] = None
    cfg: Optional[dict] = None


@dataclass
class _RuleSpec(DataClassJsonMixin):
    """One quant_cfg item as written: a rule, or { import = "UNIT" }."""

    KEYS: ClassVar[dict] = {
        "quantizer_name": _STR, "parent_class": _STR, "cfg": _TABLE, "enable": _BOOL, "import": _STR,
    }
    quantizer_name: Optional[str] = None
    parent_class: Optional[str] = None
    cfg: Optional[dict] = None
    enable: Optional[bool] = None
    import_: Optional[str] = field(default=None, metadata=config(field_name="import"))


@dataclass
class _CfgSpec(DataClassJsonMixin):
    """A cfg table as written; `import` names numerics units merged before the inline keys."""

    KEYS: ClassVar[dict] = {"format": _STR, "axis": _AXIS, "use_constant_amax": _BOOL, "import": _NAMES}
    format: Optional[str] = None
    axis: Union[int, list, None] = None
    use_constant_amax: Optional[bool] = None
    import_: Union[str, list, None] = field(default=None, metadata=config(field_name="import"))


def _fail(path: Path, key: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{_show_path(path)}: {key}: {problem}. {fix}")


def _show_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_table(table: object, spec: type, path: Path, key: str):
    """Unknown keys (with the closest valid one) and wrong types -> ValueError; else spec.from_dict."""
    if not isinstance(table, dict):
        raise _fail(path, key, f"expected a table, got {_toml_type(table)} {table!r}", "Write it as a TOML table.")
    for name, value in table.items():
        where = f"{key}.{name}" if key else name
        if name not in spec.KEYS:
            close = difflib.get_close_matches(name, spec.KEYS, n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"Valid keys here: {', '.join(spec.KEYS)}."
            if name == "enable" and "format" in spec.KEYS:
                hint = "`enable` belongs on the rule, next to cfg, not inside it."
            raise _fail(path, where, "unknown key", hint)
        types, wanted = spec.KEYS[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            problem = f"expected {wanted}, got {_toml_type(value)} {value!r}"
            raise _fail(path, where, problem, f"Write {name} as {wanted}.")
    return spec.from_dict(table)


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _read_toml(path: Path, imported_from: str = "") -> dict:
    if not path.is_file():
        raise ValueError(f"{_show_path(path)}: no such file{imported_from}.")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:  # its message carries "(at line N, column M)"
        raise ValueError(f"{_show_path(path)}: bad TOML syntax: {error}. Fix the file at that line.") from None


# --------------------------------------------------------------------------------------------
# Loading and resolving
# --------------------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every shipped recipe (refquant/recipes/, units excluded), sorted by name."""
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.toml"))}


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A shipped recipe's name, else a path (with or without .toml)."""
    text = os.fspath(name_or_path)
    shipped = shipped_recipes()
    if isinstance(name_or_path, str) and text in shipped:
        return shipped[text]
    for candidate in (Path(text), Path(text + ".toml")):
        if candidate.is_file():
            return candidate.resolve()
    close = difflib.get_close_matches(text, shipped, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"recipe {text!r} is neither a shipped recipe nor a file. {hint}Shipped recipes: "
        f"{', '.join(shipped)} (python3 -m refquant recipes list); or pass a path to a .toml file."
    )


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load, resolve and validate a recipe: a shipped name (see shipped_recipes) or a TOML path.

    Returns a Recipe whose quant_cfg holds every rule in application order, imports spliced in.
    Each file is read and resolved once however often it is imported; imports may nest
    MAX_IMPORT_DEPTH files deep. Raises ValueError naming the file, the key and the fix for any
    mistake.
    """
    path = find_recipe(name_or_path)
    resolver = _Resolver()
    document = resolver.read(path)
    if "cfg" in document:
        raise _fail(path, "cfg", "this file is a numerics unit (a cfg table), not a recipe",
                    "Import it from a rule's cfg (cfg = { import = \"...\" }), or load a recipe.")
    spec = _check_table(document, _RecipeFileSpec, path, "")
    if spec.algorithm is not None and spec.algorithm not in ALGORITHMS:
        close = difflib.get_close_matches(spec.algorithm, ALGORITHMS, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise _fail(path, "algorithm", f"unknown algorithm {spec.algorithm!r}",
                    f"{hint}Use \"max\" (max calibration) or \"none\" (no calibration).")
    rules = resolver.rules(path, spec, stack=(path,))
    if not rules:
        raise _fail(path, "quant_cfg", "the recipe resolves to no rules at all", "Add rules or imports.")
    return Recipe(
        name=path.stem,
        description=spec.description or "",
        algorithm=ALGORITHMS[spec.algorithm or "max"],  # modelopt's QuantizeConfig default: max
        quant_cfg=rules,
        source=str(path),
    )


# How many files an import chain may hold (the recipe included): far beyond any real recipe, and
# far below Python's recursion limit, so a runaway chain is an error that shows it.
MAX_IMPORT_DEPTH = 32


class _Resolver:
    """Resolves one recipe's imports. Each file is parsed once and each unit resolved once (a
    unit's rules do not depend on who imports it), so a unit imported from many places costs one
    read; `stack` is the chain of files being resolved, for cycles and the depth limit."""

    def __init__(self) -> None:
        self.documents: dict[Path, dict] = {}
        self.unit_rules: dict[Path, list[QuantRule]] = {}
        self.cfg_tables: dict[Path, dict] = {}

    def read(self, path: Path, imported_from: str = "") -> dict:
        if path not in self.documents:
            self.documents[path] = _read_toml(path, imported_from)
        return self.documents[path]

    def rules(self, path: Path, spec: _RecipeFileSpec, stack: tuple[Path, ...]) -> list[QuantRule]:
        if spec.quant_cfg is None:
            raise _fail(path, "quant_cfg", "missing", "Add [[quant_cfg]] rules (or import units) to the file.")
        if not spec.quant_cfg:
            raise _fail(path, "quant_cfg", "the rule list is empty", "Add at least one rule or import.")
        rules: list[QuantRule] = []
        for index, item in enumerate(spec.quant_cfg):
            key = f"quant_cfg[{index}]"
            rule_spec = _check_table(item, _RuleSpec, path, key)
            if rule_spec.import_ is not None:
                others = sorted(set(item) - {"import"})
                if others:
                    raise _fail(path, key, f"an import item takes no other keys, found {', '.join(others)}",
                                "Put the import in its own item and the rule in another.")
                rules += self.import_rules(rule_spec.import_, path, key, stack)
            else:
                rules.append(self.build_rule(rule_spec, path, key, stack))
        return rules

    def build_rule(self, spec: _RuleSpec, path: Path, key: str, stack: tuple[Path, ...]) -> QuantRule:
        origin = f"{_origin_name(path)} {key}"
        if spec.quantizer_name is None:
            raise _fail(path, key, "rule has no quantizer_name",
                        "Add quantizer_name = \"<glob>\", e.g. \"*weight_quantizer\".")
        if spec.parent_class is not None:
            parent_class_of(spec.parent_class, where=f"{_show_path(path)}: {key}.parent_class")
        cfg_table = spec.cfg
        if cfg_table == {} and spec.enable is False:
            cfg_table = None  # modelopt: an empty cfg on a disabling rule is no cfg at all
        if cfg_table is None:
            if spec.enable is None:
                raise _fail(path, key, "rule has neither cfg nor enable",
                            "Add cfg = { import = \"numerics/fp8\" } to configure it, or enable = false to switch it off.")
            return QuantRule(spec.quantizer_name, spec.parent_class, None, spec.enable, origin)
        enable = True if spec.enable is None else spec.enable
        cfg = self.resolve_cfg(cfg_table, path, f"{key}.cfg", stack, enable)
        return QuantRule(spec.quantizer_name, spec.parent_class, cfg, enable, origin)

    def resolve_cfg(self, table: dict, path: Path, key: str, stack: tuple[Path, ...], enable: bool) -> QuantizerConfig:
        merged = self.merged_cfg_table(table, path, key, stack)
        spec = _check_table(merged, _CfgSpec, path, key)
        if spec.format is None:
            raise _fail(path, key, "cfg has no format",
                        'Add format = "fp8" or "nvfp4", or import a numerics unit: { import = "numerics/fp8" }.')
        if spec.format not in RECIPE_FORMATS:
            close = difflib.get_close_matches(spec.format, RECIPE_FORMATS, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise _fail(path, f"{key}.format", f"unknown format {spec.format!r}",
                        f"{hint}Use one of {', '.join(RECIPE_FORMATS)}; to switch a quantizer off use enable = false.")
        if spec.axis is not None and not (isinstance(spec.axis, int) or all(
                isinstance(a, int) and not isinstance(a, bool) for a in spec.axis)):
            raise _fail(path, f"{key}.axis", f"expected an int or a list of ints, got {spec.axis!r}", "e.g. axis = 0.")
        if spec.format == "nvfp4" and spec.axis is not None:
            raise _fail(path, f"{key}.axis", "NVFP4 takes no per-channel axis (one global amax, per-block scales "
                        "along the last dim)", "Remove axis, or use format = \"fp8\" for per-channel scales.")
        try:
            return QuantizerConfig(
                format=spec.format, enable=enable, axis=spec.axis,
                use_constant_amax=bool(spec.use_constant_amax),
            )
        except ValueError as error:
            raise _fail(path, key, str(error).rstrip("."), "Fix the cfg table.") from None

    def merged_cfg_table(self, table: dict, path: Path, key: str, stack: tuple[Path, ...]) -> dict:
        """Numerics units named by `import`, merged left to right, then the inline keys (they win)."""
        if not isinstance(table, dict) or "import" not in table:
            return table
        names = table["import"]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _fail(path, f"{key}.import", f"expected a unit name or a list of names, got {names!r}",
                        "e.g. import = \"numerics/fp8\".")
        merged: dict = {}
        for name in names:
            unit_path = _find_import(name, path, f"{key}.import", stack)
            if unit_path not in self.cfg_tables:
                document = self.read(unit_path, f" (imported by {_show_path(path)} {key})")
                if "quant_cfg" in document or "cfg" not in document:
                    raise _fail(path, f"{key}.import", f"{name!r} ({_show_path(unit_path)}) is a rules unit, not a cfg",
                                f"Import it as a list item {{ import = \"{name}\" }}, or import a numerics unit here.")
                unit = _check_table(document, _CfgUnitSpec, unit_path, "")
                self.cfg_tables[unit_path] = self.merged_cfg_table(unit.cfg, unit_path, "cfg", stack + (unit_path,))
            merged |= self.cfg_tables[unit_path]
        return merged | {k: v for k, v in table.items() if k != "import"}

    def import_rules(self, name: str, path: Path, key: str, stack: tuple[Path, ...]) -> list[QuantRule]:
        unit_path = _find_import(name, path, f"{key}.import", stack)
        if unit_path not in self.unit_rules:
            document = self.read(unit_path, f" (imported by {_show_path(path)} {key})")
            if "cfg" in document:
                raise _fail(path, f"{key}.import", f"{name!r} ({_show_path(unit_path)}) is a numerics unit (a cfg)",
                            f"Use it inside a rule: cfg = {{ import = \"{name}\" }}.")
            # An imported recipe gives its rules only: the loaded file's own algorithm and
            # description stand (docs/recipes.md, "Importing a recipe").
            spec = _check_table(document, _RecipeFileSpec, unit_path, "")
            self.unit_rules[unit_path] = self.rules(unit_path, spec, stack + (unit_path,))
        return [copy.copy(rule) for rule in self.unit_rules[unit_path]]  # each splice its own rule objects


def _find_import(name: str, importer: Path, key: str, stack: tuple[Path, ...]) -> Path:
    """NAME.toml next to the importing file, else among the shipped units, else among the shipped
    recipes; cycles and chains longer than MAX_IMPORT_DEPTH are errors."""
    candidates = [importer.parent / f"{name}.toml", UNITS_DIR / f"{name}.toml", RECIPES_DIR / f"{name}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            found = candidate.resolve()
            if found in stack:
                chain = " -> ".join(_show_path(p) for p in stack + (found,))
                raise _fail(importer, key, f"import cycle: {chain}", "Remove one of these imports.")
            if len(stack) >= MAX_IMPORT_DEPTH:
                shown = [*map(_show_path, stack[:3]), "...", *map(_show_path, (*stack[-2:], found))]
                chain = " -> ".join(shown)
                raise _fail(importer, key, f"imports nest deeper than {MAX_IMPORT_DEPTH} files ({chain})",
                            "Import the units you need from fewer levels (a unit may import several units).")
            return found
    known = sorted(str(p.relative_to(UNITS_DIR).with_suffix("")) for p in UNITS_DIR.rglob("*.toml"))
    close = difflib.get_close_matches(name, known + list(shipped_recipes()), n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise _fail(importer, key, f"cannot find unit {name!r} (looked for {', '.join(map(_show_path, candidates))})",
                f"{hint}Shipped units: {', '.join(known)}; shipped recipes: {', '.join(shipped_recipes())}.")


def _origin_name(path: Path) -> str:
    try:
        return str(path.relative_to(RECIPES_DIR))
    except ValueError:
        return _show_path(path)


def parent_class_of(name: str, where: str = "parent_class") -> type[nn.Module]:
    """"nn.Linear" -> torch.nn.Linear; anything that is not a torch.nn module class is an error."""
    module_classes = sorted(n for n, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module))
    cls = getattr(nn, name[3:], None) if name.startswith("nn.") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        close = difflib.get_close_matches(name, [f"nn.{n}" for n in module_classes], n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{where}: {name!r} is not a torch.nn module class. {hint}Write it as \"nn.<Class>\", "
                         "e.g. \"nn.Linear\", \"nn.Embedding\", \"nn.BatchNorm2d\".")
    return cls


# --------------------------------------------------------------------------------------------
# Applying a recipe to a model (docs/modelopt_behaviour.md §7.2)
# --------------------------------------------------------------------------------------------

# Fused-expert quantizer lists ("...weight_quantizers.3") also match the singular pattern.
_FUSED_EXPERT_INDEX = re.compile(r"(weight_quantizers?|input_quantizers?)\.\d+(?=$|\.)")


def fused_expert_form(name: str) -> str:
    """A quantizer name with a fused-expert list index dropped ("...weight_quantizers.3" ->
    "...weight_quantizer"), the form the singular pattern matches."""
    return _FUSED_EXPERT_INDEX.sub(lambda m: m.group(1).removesuffix("s"), name)


_GLOB_SPECIALS = re.compile(r"[*?\[]")


def _literal_glob(pattern: str) -> Optional[tuple[bool, bool, str]]:
    """(leading *, trailing *, text) for a pattern that is plain text with at most a `*` at either
    end ("*", "*text*", "*text", "text*", "text": the shapes recipes use), else None."""
    star = pattern.startswith("*"), pattern.endswith("*") and len(pattern) > 1
    text = pattern[star[0]:len(pattern) - star[1]]
    return None if _GLOB_SPECIALS.search(text) else (*star, text)


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> Callable[[str], Any]:
    """fnmatch.fnmatchcase(name, pattern) as a test that is truthy where it holds: a string test for
    a _literal_glob pattern (several times faster than fnmatch's regex, and a model with MoE
    experts holds thousands of quantizers for every rule), else that regex."""
    literal = _literal_glob(pattern)
    if literal is None:
        return re.compile(fnmatch.translate(pattern)).match
    text = literal[2]
    if literal[:2] == (True, True):
        return lambda name: text in name
    if literal[:2] == (True, False):
        return (lambda name: True) if not text else (lambda name: name.endswith(text))
    if literal[:2] == (False, True):
        return lambda name: name.startswith(text)
    return lambda name: name == text


def rule_matches(rule: QuantRule, name: str, parent: nn.Module | None, parent_class: type | None = None) -> bool:
    """fnmatch (case-sensitive) on the full dotted name, or on its fused-expert form; then the
    parent."""
    return _name_matches(_glob(rule.quantizer_name), name, _other_form(name)) and _parent_accepts(rule, parent, parent_class)


def _other_form(name: str) -> str | None:
    """The name's fused-expert form where it differs from the name, else None."""
    form = fused_expert_form(name)
    return form if form != name else None


def _name_matches(match: Callable[[str], Any], name: str, other_form: str | None) -> bool:
    """A rule's name test (match: its _glob): the dotted name, or its other fused-expert form."""
    return bool(match(name)) or (other_form is not None and bool(match(other_form)))


def _parent_accepts(rule: QuantRule, parent: nn.Module | None, parent_class: type | None = None) -> bool:
    """A rule's parent test: none asked, or the parent is of its class (parent_class: resolved already)."""
    if rule.parent_class is None:
        return True
    return isinstance(parent, parent_class or parent_class_of(rule.parent_class))


class _QuantizerNames:
    """A model's quantizers as rules see them, from one walk over its modules: names, parents (`a.b`
    for `a.b.c`; the model for a top-level name) and fused-expert forms; `matching` is
    rule_matches over all of them at once (a model with MoE experts holds thousands)."""

    def __init__(self, model: nn.Module):
        modules = dict(model.named_modules())
        self.quantizers = [(name, module) for name, module in modules.items() if isinstance(module, TensorQuantizer)]
        self.names = [name for name, _ in self.quantizers]
        self.parents = [modules[name.rpartition(".")[0]] for name in self.names]
        self._other_forms = [_other_form(name) for name in self.names]
        # every name and form on a line of its own: a _literal_glob pattern whose text is not in
        # here matches no quantizer, found without a test a name
        self._all_text = "\n".join(self.names + [form for form in self._other_forms if form is not None])

    def matching(self, rule: QuantRule, parent_class: type | None = None, among: Iterable[int] | None = None) -> list[int]:
        """The indices (of `among`, default all) of the quantizers rule_matches(rule, ...) accepts."""
        literal = _literal_glob(rule.quantizer_name)
        if literal is not None and literal[2] not in self._all_text:
            return []
        match = _glob(rule.quantizer_name)
        names, forms = self.names, self._other_forms
        found = [i for i in (range(len(names)) if among is None else among) if _name_matches(match, names[i], forms[i])]
        if rule.parent_class is None:
            return found
        parent_class = parent_class or parent_class_of(rule.parent_class)  # once, not a name at a time
        return [i for i in found if _parent_accepts(rule, self.parents[i], parent_class)]


def apply_recipe(model: nn.Module, recipe: Recipe) -> RecipeApplication:
    """Configure every TensorQuantizer in model.named_modules() by the recipe's rules, in order.

    A cfg rule replaces the whole config (QuantizerConfig with enable = the rule's, default True);
    an enable-only rule flips on/off. The parent of `a.b.c` is the module `a.b` (the model for a
    top-level name). Returns the names each rule matched and the rules that matched nothing.
    """
    named = _QuantizerNames(model)
    quantizers = named.quantizers
    # before any rule: a rule that switches a quantizer off would already change the model
    refuse_folded(quantizers, f"apply recipe {recipe.name}")
    matches: dict[int, list[str]] = {}
    for index, rule in enumerate(recipe.quant_cfg):
        where = f"{recipe.name} quant_cfg[{index}] ({rule.origin or rule.quantizer_name})"
        if rule.cfg is None and rule.enable is None:
            raise ValueError(f"{where}: rule has neither cfg nor enable; give it one of them.")
        parent_class = parent_class_of(rule.parent_class, where) if rule.parent_class else None
        matched = []
        # one config for every quantizer the rule matches: configs are frozen
        rule_config = None if rule.cfg is None else replace(rule.cfg, enable=True if rule.enable is None else rule.enable)
        for position in named.matching(rule, parent_class):
            name, quantizer = quantizers[position]
            matched.append(name)
            if rule_config is not None:
                quantizer.set_config(rule_config)
            else:
                try:
                    quantizer.set_enabled(rule.enable)
                except ValueError as error:
                    raise ValueError(f"{where} enables {name}: {error}") from None
        matches[index] = matched
    unmatched = [rule for index, rule in enumerate(recipe.quant_cfg) if not matches[index]]
    return RecipeApplication(recipe, matches, unmatched)


def check_application(application: RecipeApplication, model: nn.Module) -> list[str]:
    """Refuse what a recipe typo does to a model; return a notice for each other suspect rule.

    Rules that switch quantizers off and match nothing are normal (default_disabled_quantizers
    names the routers, vision towers, ... of other families) and pass. Raises ValueError, naming
    each such rule and the fix, when after apply_recipe(model, recipe)
      - a rule that enables or configures quantizers matched none, and changing one word of its
        pattern by one edit (a letter added, dropped, changed, or two swapped) into a word of the
        model's quantizer names makes it match some: "did you mean ...";
      - a rule that switches quantizers off matched none, and such an edit makes it match
        quantizers that are now enabled;
      - a rule that enables or configures matched none, and no weight quantizer is enabled: the
        recipe asks for quantization and would quantize no weight.
    Returns one line for each other enabling rule that matched nothing (a rule for another family).
    """
    named = _QuantizerNames(model)
    quantizers = named.quantizers
    words = {word for name, _ in quantizers for word in _WORD.findall(name)}
    components = {part for name, _ in quantizers for part in name.split(".")}
    recipe = application.recipe
    errors, notices = [], []
    unmatched_enabling = False
    every = list(range(len(quantizers)))
    enabled = [index for index in every if quantizers[index][1].is_enabled]
    for index, rule in enumerate(recipe.quant_cfg):
        if application.matches.get(index):
            continue
        enables = rule.cfg is not None or bool(rule.enable)
        unmatched_enabling |= enables
        suggestion = _one_edit_fix(rule, every if enables else enabled, named, words, components)
        where = f"quant_cfg[{index}] ({rule.origin or 'rule'}: quantizer_name={rule.quantizer_name!r})"
        if suggestion is not None:
            pattern, matched = suggestion
            effect = "would match" if enables else "would switch off"
            errors.append(f"{where} matched no quantizer. Did you mean {pattern!r}? ({effect} {len(matched)}, "
                          f"e.g. {matched[0]})")
        elif enables:
            notices.append(f"recipe {recipe.name} {where} enables quantizers but matched none in {type(model).__name__}.")
    weights_enabled = any(is_weight_quantizer(name) and q.is_enabled for name, q in quantizers)
    if unmatched_enabling and not weights_enabled:
        errors += [notice.removeprefix(f"recipe {recipe.name} ") for notice in notices]
        errors.append(f"so the recipe quantizes no weight of {type(model).__name__}")
        notices = []
    if errors:
        example = next((name for name, _ in quantizers if is_weight_quantizer(name)), quantizers[0][0])
        raise ValueError(
            f"recipe {recipe.name} does not fit {type(model).__name__}: " + "; ".join(errors) + ". Fix the "
            f"pattern (quantizer names look like {example!r}), or delete the rule."
        )
    return notices


_WORD = re.compile(r"[A-Za-z0-9]+")
_GLOB_BRACKETS = re.compile(r"\[[^\]]*\]")
_LITERAL_RUN = re.compile(r"[^.*?\[\]]+")


def _one_edit_fix(rule: QuantRule, targets: list[int], named: _QuantizerNames, words: set[str], components: set[str]):
    """(pattern, names it matches) for the first one-edit change of a word (or a literal run
    between dots and wildcards) of the rule's pattern into a word (or a dotted component) of the
    quantizer names after which the rule matches some of `targets` (indices into `named`); None
    when there is none."""
    pattern = rule.quantizer_name
    brackets = [match.span() for match in _GLOB_BRACKETS.finditer(pattern)]
    outside = lambda span: not any(start < span[1] and span[0] < end for start, end in brackets)  # noqa: E731
    edits = []
    for expression, vocabulary in ((_WORD, words), (_LITERAL_RUN, components)):
        for match in expression.finditer(pattern):
            if outside(match.span()):
                edits += [(match.span(), word) for word in sorted(vocabulary) if _one_edit_apart(match.group(), word)]
    parent_class = parent_class_of(rule.parent_class) if rule.parent_class else None
    for (start, end), word in edits:
        candidate = replace(rule, quantizer_name=pattern[:start] + word + pattern[end:])
        matched = named.matching(candidate, parent_class, among=targets)
        if matched:
            return candidate.quantizer_name, [named.names[i] for i in matched]
    return None


def _one_edit_apart(a: str, b: str) -> bool:
    """True when b is a with one character inserted, deleted or changed, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        differ = [i for i in range(len(a)) if a[i] != b[i]]
        if len(differ) == 1:
            return True
        i, j = differ[0], differ[-1]
        return len(differ) == 2 and j == i + 1 and a[i] == b[j] and a[j] == b[i]
    shorter, longer = sorted((a, b), key=len)
    i = next((k for k in range(len(shorter)) if shorter[k] != longer[k]), len(shorter))
    return shorter[i:] == longer[i + 1:]


def effective_config(recipe: Recipe, quantizer_name: str, parent: nn.Module | None = None) -> QuantizerConfig | None:
    """The config a quantizer of this name ends with (None: never given a format), without a model."""
    state: QuantizerConfig | None = None
    for rule in recipe.quant_cfg:
        if not rule_matches(rule, quantizer_name, parent):
            continue
        if rule.cfg is not None:
            state = replace(rule.cfg, enable=True if rule.enable is None else rule.enable)
        elif state is not None:
            state = replace(state, enable=rule.enable)
    return state


def describe_config(state: QuantizerConfig | None) -> str:
    if state is None or not state.enable:
        return "off"
    if state.use_constant_amax:
        return f"{state.format}, constant amax 448 (cast, not calibrated)"
    return f"{state.format}, calibrated amax"


# --------------------------------------------------------------------------------------------
# Recipe vs --kv-cache-qformat (docs/modelopt_behaviour.md §8.4)
# --------------------------------------------------------------------------------------------


def select_recipe(
    recipe: str | os.PathLike | None,
    *,
    qformat: str = "fp8",
    kv_cache_qformat: str | None = None,
) -> tuple[Recipe, list[str]]:
    """The recipe a PTQ run uses, and notices to print.

    recipe given: it is loaded and used as is; a kv_cache_qformat is ignored (the recipe is
    authoritative for the KV cache, never merged) and a notice says so. No recipe: modelopt's
    hf_ptq composition: [base_disable_all, body of qformat, default_disabled_quantizers], then the
    KV unit of kv_cache_qformat (default fp8_cast; "none" adds none) APPENDED after the disabled
    block, as hf_ptq does.
    """
    if kv_cache_qformat is not None and kv_cache_qformat not in KV_CACHE_UNITS:
        raise ValueError(f"kv_cache_qformat={kv_cache_qformat!r} is not known; use one of {', '.join(KV_CACHE_UNITS)}.")
    if recipe is not None:
        loaded = load_recipe(recipe)
        notices = []
        if kv_cache_qformat is not None:
            kv_state = effective_config(loaded, "model.layers.0.self_attn.k_bmm_quantizer")
            notices.append(
                f"--kv-cache-qformat {kv_cache_qformat} is ignored: recipe {loaded.name} is authoritative "
                f"for the KV cache (there K/V: {describe_config(kv_state)}) and is never merged with the "
                "flag. Drop the flag, or choose a recipe with the KV mode you want."
            )
        return loaded, notices
    if qformat not in QFORMAT_UNITS:
        raise ValueError(f"qformat={qformat!r} is not known; use one of {', '.join(QFORMAT_UNITS)}, or pass a recipe.")
    kv = DEFAULT_KV_CACHE_QFORMAT if kv_cache_qformat is None else kv_cache_qformat
    units = ["base_disable_all", QFORMAT_UNITS[qformat], "default_disabled_quantizers"]
    if KV_CACHE_UNITS[kv] is not None:
        # after DD, as hf_ptq appends it (docs/modelopt_behaviour.md §8.4)
        units.append(KV_CACHE_UNITS[kv])
    rules = [rule for unit in units for rule in _unit_rules(unit)]
    composed = Recipe(
        name=f"qformat={qformat},kv_cache_qformat={kv}",
        description=(f"--qformat {qformat} --kv-cache-qformat {kv}: units {' + '.join(units)} "
                     "(KV rule after the disabled block, as modelopt's hf_ptq)"),
        algorithm="max",
        quant_cfg=rules,
        source=", ".join(str(UNITS_DIR / f"{unit}.toml") for unit in units),
    )
    return composed, []


def _unit_rules(name: str) -> list[QuantRule]:
    path = (UNITS_DIR / f"{name}.toml").resolve()
    resolver = _Resolver()
    spec = _check_table(resolver.read(path), _RecipeFileSpec, path, "")
    return resolver.rules(path, spec, stack=(path,))


# --------------------------------------------------------------------------------------------
# Printing: one flat table, or TOML that loads back to the same recipe
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("#", "quantizer_name", "parent_class", "enable", "format", "axis", "use_constant_amax", "from")


def recipe_table(recipe: Recipe) -> str:
    """Markdown table, one row per rule; format/axis/use_constant_amax empty for enable-only rules."""
    rows = []
    for number, rule in enumerate(recipe.quant_cfg, start=1):
        cfg = rule.cfg
        enable = True if cfg is not None and rule.enable is None else rule.enable
        rows.append((
            str(number), f"`{rule.quantizer_name}`", rule.parent_class or "", str(enable).lower(),
            cfg.format if cfg else "", "" if cfg is None else str(cfg.axis),
            "" if cfg is None else str(cfg.use_constant_amax).lower(), rule.origin.split(" ")[0].removesuffix(".toml"),
        ))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(TABLE_COLUMNS)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(TABLE_COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in rows])


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as a self-contained TOML file (no imports); load_recipe reads it back to
    an equal Recipe (name and source aside). Raises ValueError for text TOML cannot hold (a lone
    surrogate, which no UTF-8 file can)."""
    algorithm = next(k for k, v in ALGORITHMS.items() if v == recipe.algorithm)
    out = [
        f"# Resolved from {_toml_str(recipe.source)} (refquant recipes show --toml): every rule inline, in order.",
        f"description = {_toml_str(recipe.description)}",
        f"algorithm = {_toml_str(algorithm)}",
    ]
    for rule in recipe.quant_cfg:
        out += ["", "[[quant_cfg]]", f"quantizer_name = {_toml_str(rule.quantizer_name)}"]
        if rule.parent_class is not None:
            out.append(f"parent_class = {_toml_str(rule.parent_class)}")
        if rule.enable is not None or rule.cfg is not None:
            out.append(f"enable = {str(True if rule.enable is None else rule.enable).lower()}")
        if rule.cfg is not None:
            cfg = [f"format = {_toml_str(rule.cfg.format)}"]
            if rule.cfg.axis is not None:
                cfg.append(f"axis = {json.dumps(rule.cfg.axis)}")
            cfg.append(f"use_constant_amax = {str(rule.cfg.use_constant_amax).lower()}")
            out.append("cfg = { " + ", ".join(cfg) + " }")
    return "\n".join(out) + "\n"


# TOML basic strings (toml.io v1.0.0, "String"): a backslash, a quote and the control characters
# U+0000-U+001F and U+007F must be escaped; every other character is written as it is (UTF-8).
# JSON's escapes would write a character beyond U+FFFF as a surrogate pair, which TOML refuses.
_TOML_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(text: str) -> str:
    """`text` as a TOML basic string literal."""
    out = []
    for char in text:
        code = ord(char)
        if char in _TOML_SHORT_ESCAPES:
            out.append(_TOML_SHORT_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(
                f"{text!r} holds a lone surrogate (U+{code:04X}), which no TOML (UTF-8) file can hold. "
                "Replace it with the character it was meant to be."
            )
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
