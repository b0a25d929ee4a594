"""`python3 -m refquant recipes list|show`: what it prints, and that docs/recipes.md shows the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from refquant.cli import main
from refquant.quant.recipe import load_recipe, recipe_table, shipped_recipes

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(shipped_recipes())


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["recipes", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_each_shipped_recipe_with_its_one_line_description(capsys):
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(SHIPPED) == 6
    for line, name in zip(lines, SHIPPED):
        assert line.split()[0] == name
        assert line.split(None, 1)[1] == load_recipe(name).description


@pytest.mark.parametrize("name", SHIPPED)
def test_show_prints_the_resolved_recipe_as_one_flat_table(name, capsys):
    code, out, _ = run(capsys, "show", name)
    assert code == 0
    assert f"recipe:      {name}" in out and "algorithm:   max" in out
    table = out[out.index("| #"):].rstrip("\n")
    assert table == recipe_table(load_recipe(name))
    assert len(table.splitlines()) == 2 + 27


def test_show_toml_writes_a_recipe_that_loads_back_identically(capsys, tmp_path):
    code, out, _ = run(capsys, "show", "nvfp4_default-nvfp4_cast_kv", "--toml")
    assert code == 0 and "import" not in out
    path = tmp_path / "resolved.toml"
    path.write_text(out)
    assert load_recipe(path).quant_cfg == load_recipe("nvfp4_default-nvfp4_cast_kv").quant_cfg
    code, again, _ = run(capsys, "show", str(path)[: -len(".toml")])  # a path, without .toml
    assert code == 0 and recipe_table(load_recipe(path)) in again


def test_show_of_an_unknown_recipe_exits_2_with_the_error(capsys):
    code, out, err = run(capsys, "show", "nvfp4_default-fp8_cast")
    assert code == 2 and out == ""
    assert "Did you mean 'nvfp4_default-fp8_cast_kv'?" in err


def test_recipes_command_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "refquant", "recipes", "list"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.count("\n") == 6


@pytest.mark.parametrize("name", SHIPPED)
def test_docs_show_the_current_resolved_table_of_every_recipe(name):
    docs = (REPO / "docs" / "recipes.md").read_text()
    assert recipe_table(load_recipe(name)) in docs, f"regenerate docs/recipes.md: python3 -m refquant recipes show {name}"
