"""The packages are layers and imports point down them (README "Layout"): numerics at the bottom,
compiled and dialects beside it (each importing it), quant above them, hf above that, the command line on top.
And no module of refquant uses another's private names: what two modules share is public in the one
that owns it.

Read from the source with ast, so a lazy import inside a function counts as much as one at the top,
and so does importlib.import_module("refquant.x") with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# What each part of refquant may import from refquant. The package's own __init__ and __main__
# (the public API and `python3 -m refquant`) may import anything; _version anyone may import.
UNRESTRICTED = {"", "__main__"}  # part_of("refquant"), part_of("refquant.__main__")
ALLOWED = {
    "_version": set(),
    "numerics": {"numerics"},
    "compiled": {"numerics", "compiled"},
    "dialects": {"numerics", "dialects"},
    "testing": {"numerics", "dialects", "testing"},
    "quant": {"numerics", "compiled", "quant"},
    "hf": {"numerics", "dialects", "quant", "hf"},
    "cli": {"numerics", "compiled", "dialects", "testing", "quant", "hf", "cli"},
}


def part_of(module: str) -> str:
    """The part of refquant a dotted module name belongs to: "refquant.hf.export.plan" -> "hf";
    "" for the package itself (which imports every layer)."""
    return module.split(".")[1] if "." in module else ""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every refquant module `path` imports, relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            if base == root.name:  # `from refquant import x`: x is a part of its own, or the package's
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, module) for line, module in found if module == root.name or module.startswith(f"{root.name}.")]


def layering_violations(root: Path) -> list[str]:
    """Every import of a part of refquant that the importing part may not import, as "file:line: text"."""
    violations = []
    for path in sorted(root.rglob("*.py")):
        importer = part_of(module_name(path, root))
        if importer in UNRESTRICTED:
            continue
        if importer not in ALLOWED:
            violations.append(f"{path.relative_to(root.parent)}: part {importer!r} has no layer in ALLOWED")
            continue
        for line, module in imported_modules(path, root):
            target = part_of(module)
            if target != "_version" and target not in ALLOWED[importer]:
                violations.append(f"{path.relative_to(root.parent)}:{line}: {importer} imports {module}")
    return violations


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def private_imports(root: Path) -> list[str]:
    """Every use of another refquant module's private name (`_x`; `__x__` is not private):
    `from .m import _x`, `from refquant.m import _x`, or `m._x` where `m` was imported from
    refquant, as "file:line: text"."""
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent)
        tree = ast.parse(path.read_text(), str(path))
        imported = set()  # local names an import from refquant bound
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == root.name):
                source = "." * node.level + (node.module or "")
                for alias in node.names:
                    if is_private(alias.name):
                        found.append((where, node.lineno, f"from {source} import {alias.name}"))
                    imported.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == root.name:
                        imported.add(alias.asname or root.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in imported:
                    found.append((where, node.lineno, ast.unparse(node)))
    return [f"{where}:{line}: {text}" for where, line, text in sorted(found)]


def planted_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A tree named refquant under tmp_path holding `files` (path in the tree -> text); its root."""
    root = tmp_path / "refquant"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_every_import_points_down_the_layers():
    violations = layering_violations(REPO / "refquant")
    assert not violations, "imports that point up a layer:\n" + "\n".join(violations)


def test_every_part_of_refquant_has_a_layer():
    root = REPO / "refquant"
    parts = {part_of(module_name(path, root)) for path in root.rglob("*.py")}
    assert parts - UNRESTRICTED == set(ALLOWED)


def test_the_check_catches_upward_imports(tmp_path):
    """A planted tree: each kind of import the check reads, pointing up a layer, is reported."""
    root = planted_tree(tmp_path, {
        "__init__.py": "from .hf import ptq\n",
        "numerics/__init__.py": "",
        "numerics/fp8.py": "from ..quant.quantizer import TensorQuantizer\n",
        "numerics/nvfp4.py": "def f():\n    from refquant import quantize_model\n",
        "quant/__init__.py": "",
        "quant/recipe.py": "import refquant.hf.ptq\n",
        "quant/backends.py": "import importlib\nimportlib.import_module('refquant.cli')\n",
        "hf/__init__.py": "",
        "hf/ptq.py": "from ..quant import recipe\nfrom ..numerics.fp8 import x\nfrom .. import compiled\n",
        "compiled/__init__.py": "from refquant.testing import assert_bitexact\n",
        "testing.py": "from .numerics import fp8\n",
        "extra/__init__.py": "",
    })
    assert layering_violations(root) == [
        "refquant/compiled/__init__.py:1: compiled imports refquant.testing",
        "refquant/extra/__init__.py: part 'extra' has no layer in ALLOWED",
        "refquant/hf/ptq.py:3: hf imports refquant.compiled",
        "refquant/numerics/fp8.py:1: numerics imports refquant.quant.quantizer",
        "refquant/numerics/nvfp4.py:2: numerics imports refquant.quantize_model",
        "refquant/quant/backends.py:2: quant imports refquant.cli",
        "refquant/quant/recipe.py:1: quant imports refquant.hf.ptq",
    ]


def test_no_module_uses_another_modules_private_names():
    found = private_imports(REPO / "refquant")
    assert not found, "private names used across modules (make them public where they are defined):\n" + "\n".join(found)


def test_the_check_catches_private_names_across_modules(tmp_path):
    """A planted tree: each way of reaching another module's private name is reported; dunder names,
    public names and a module's own private names are not."""
    root = planted_tree(tmp_path, {
        "__init__.py": "from ._version import __version__\n",
        "_version.py": "__version__ = '0'\n",
        "numerics/__init__.py": "",
        "numerics/nvfp4.py": "def _amax(x):\n    return x\n\n\ndef amax(x):\n    return _amax(x)\n",
        "dialects/__init__.py": "",
        "dialects/a.py": "from ..numerics.nvfp4 import _amax, amax\n",
        "dialects/b.py": "def f(x):\n    from refquant.numerics.nvfp4 import _amax\n    return _amax(x)\n",
        "dialects/c.py": "import refquant.numerics.nvfp4 as reference\n\nreference._amax(1)\nreference.amax(1)\n",
        "dialects/d.py": "import refquant\n\nrefquant.numerics.nvfp4._amax(1)\n",
    })
    assert private_imports(root) == [
        "refquant/dialects/a.py:1: from ..numerics.nvfp4 import _amax",
        "refquant/dialects/b.py:2: from refquant.numerics.nvfp4 import _amax",
        "refquant/dialects/c.py:3: reference._amax",
        "refquant/dialects/d.py:3: refquant.numerics.nvfp4._amax",
    ]
