"""The package as a user installs it: a wheel built by the standard tool (`python3 -m build`, the
wheel made from the sdist), installed into a fresh virtual environment, runs the main job and
lists the shipped recipes with no source tree anywhere on its path."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

from conftest import REPO

from refquant import __version__
from refquant.quant.recipe import shipped_recipes

# What the build needs from the checkout; the package data travels inside refquant/.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "refquant")

# Run in the venv: the wheel's own requirements (extras aside) that the environment does not meet.
UNMET_REQUIREMENTS = """
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
unmet = []
for text in requires("refquant"):
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    try:
        found = version(requirement.name)
    except PackageNotFoundError:
        unmet.append(text)
        continue
    if not requirement.specifier.contains(found, prereleases=True):
        unmet.append(f"{text} (found {found})")
print(unmet)
"""


# Run in the venv with the checkout's path: refquant's file and version, and whether any entry of
# sys.path lies in the checkout (as paths: a venv beside it may share its name's first letters).
WHERE_REFQUANT_COMES_FROM = """
import sys
from pathlib import Path
import refquant
checkout = Path(sys.argv[1]).resolve()
print(refquant.__file__, refquant.__version__, any(Path(p).resolve().is_relative_to(checkout) for p in sys.path))
"""


def run(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def user_environment(venv_dir: Path) -> dict:
    """The environment of a user's shell with the venv active: no PYTHONPATH (the tests run with
    the checkout on it), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv_dir)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    return env


def see_this_environments_packages(venv_dir: Path) -> None:
    """Where the tests run in a virtual environment, a venv made from it with system site packages
    sees the base interpreter's packages, not this environment's (torch among them): list this
    environment's site-packages in a .pth file of the new venv. Its entries are plain paths, so
    the .pth files in them (the checkout's editable install) are not run."""
    if sys.prefix == sys.base_prefix:
        return
    (site_packages,) = (venv_dir / "lib").glob("python*/site-packages")
    (site_packages / "tests_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def test_wheel_installed_in_a_fresh_venv_runs_the_main_job_and_lists_the_recipes(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    # No isolation: the build backend (setuptools) is already installed, so no download is needed.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    wheels = sorted((tmp_path / "dist").glob("refquant-*.whl"))
    sdists = sorted((tmp_path / "dist").glob("refquant-*.tar.gz"))
    assert [w.name for w in wheels] == [f"refquant-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"refquant-{__version__}.tar.gz"]

    # torch, transformers and the rest come from this interpreter's site-packages; refquant must
    # come from the wheel (forced: the checkout's own install of the same version is visible).
    venv_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(venv_dir)
    python = venv_dir / "bin" / "python"
    see_this_environments_packages(venv_dir)
    shutil.rmtree(source)
    workdir = tmp_path / "user"
    workdir.mkdir()
    env = user_environment(venv_dir)
    # pip >= 22.3 installs into another interpreter's environment with --python (no pip in the venv)
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps", "--force-reinstall",
         "--quiet", "--disable-pip-version-check", str(wheels[0])], cwd=workdir, env=env)
    unmet = run([str(python), "-c", UNMET_REQUIREMENTS], cwd=workdir, env=env).strip()
    assert unmet == "[]", f"the wheel's requirements not met here: {unmet}"

    where = run([str(python), "-c", WHERE_REFQUANT_COMES_FROM, str(REPO)], cwd=workdir, env=env).split()
    assert Path(where[0]).resolve().is_relative_to(venv_dir.resolve()), where[0]
    assert where[1] == __version__
    assert where[2] == "False", "the checkout is on the venv's sys.path"

    listing = run([str(venv_dir / "bin" / "refquant"), "recipes", "list"], cwd=workdir, env=env)
    assert [line.split()[0] for line in listing.splitlines()] == list(shipped_recipes())

    out = workdir / "ckpt"
    job = run([str(python), "-m", "refquant", "quantize", "--out", str(out), "--no-progress"], cwd=workdir, env=env)
    assert "recipe nvfp4_default-fp8_cast_kv" in job and f"checkpoint written to {out}" in job
    assert {p.name for p in out.iterdir()} >= {"config.json", "hf_quant_config.json", "model.safetensors"}

