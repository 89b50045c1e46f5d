"""A pip-installed evev2 works outside the repository: the recipes are package data (`evev2.recipes`).

The wheel is built from a copy of the sources (so no build/ or egg-info lands in the checkout) with the venv's
setuptools, installed with `pip install --no-deps --target`, and its `evev2` console script runs the quick demo from a
folder outside the repository with only the wheel on PYTHONPATH (torch and the rest come from the venv). About 25 s on
2 cores: the build and install take 2 s, the demo (`--quick --minutes 0.25`: every phase, one to three steps each) 20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import evev2
from evev2.demo.pipeline import recipe_folder
from evev2.train.recipe import find_recipe, load_recipe, shipped_recipe_names, shipped_recipes

REPO = Path(__file__).resolve().parents[1]
#: What the build reads: the metadata, the readme it embeds, the code and the recipes.
SOURCES = ("pyproject.toml", "README.md", "src", "recipes")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(source copy, wheel, install target)."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    tree.mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        else:
            shutil.copy2(source, tree / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("evev2-*.whl")
    site = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return tree, wheel, site


def test_wheel_holds_every_module_and_recipe(built):
    """A subpackage or recipe folder missing from pyproject's `packages` / `package-data` fails here."""
    tree, wheel, _ = built
    expected = {f"evev2/{p.relative_to(tree / 'src' / 'evev2').as_posix()}"
                for p in (tree / "src" / "evev2").rglob("*") if p.is_file()}
    expected |= {f"evev2/recipes/{p.relative_to(tree / 'recipes').as_posix()}"
                 for p in (tree / "recipes").rglob("*") if p.is_file()}
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if not name.startswith("evev2-")}  # less the dist-info
    assert "evev2/recipes/tiny/stage1.toml" in expected and "evev2/serve/index.html" in expected
    assert shipped == expected


@pytest.mark.slow  # builds a wheel, runs a demo
def test_demo_runs_from_the_wheel_outside_the_repository(built, tmp_path):
    _, _, site = built
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    work = tmp_path / "elsewhere"  # no recipes/ here, and the repository is not a parent
    work.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import evev2, evev2.recipes; from evev2.train.recipe import load_recipe, "
         "shipped_recipes; load_recipe('paper/stage2_2'); print(evev2.__file__); print(shipped_recipes())"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    module, recipes = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(recipes) == site / "evev2" / "recipes"

    demo = subprocess.run([str(site / "bin" / "evev2"), "demo", "--quick", "--minutes", "0.25", "--output", "out"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    results = json.loads((work / "out" / "results.json").read_text())
    assert [s["recipe"] for s in results["plan"]["stages"]] == ["stage1.toml", "stage2_1.toml", "stage2_2.toml",
                                                                 "stage3.toml"]
    assert (work / "out" / "final" / "model.safetensors").exists()
    assert "chat with it: evev2 chat --model" in demo.stdout


def test_editable_install_reads_the_repository_recipes():
    """`make setup` installs evev2 editable: the shipped recipes are then the checkout's own recipes/ folder."""
    if not Path(evev2.__file__).resolve().is_relative_to(REPO / "src"):
        pytest.skip(f"evev2 is not this checkout's editable install ({evev2.__file__})")
    assert shipped_recipes() == REPO / "recipes"
    assert recipe_folder(None) == REPO / "recipes" / "tiny"
    assert shipped_recipe_names() == sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix()
                                            for p in (REPO / "recipes").rglob("*.toml"))


def test_recipes_by_file_or_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    assert find_recipe("tiny/stage1") == shipped_recipes() / "tiny" / "stage1.toml"
    assert load_recipe("tiny/stage3").name == load_recipe(shipped_recipes() / "tiny" / "stage3.toml").name
    own = tmp_path / "mine.toml"
    shutil.copy(shipped_recipes() / "tiny" / "stage1.toml", own)
    assert find_recipe(own) == own and find_recipe("mine.toml") == Path("mine.toml")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "stage1").write_text((shipped_recipes() / "tiny" / "stage1.toml").read_text())
    assert find_recipe("tiny/stage1") == Path("tiny/stage1")  # an existing file wins over a shipped name
    with pytest.raises(FileNotFoundError, match=r"no such file, nor a shipped recipe .*tiny/stage2_2"):
        find_recipe("tiny/stage9")
    assert find_recipe("tiny/stage1.toml") == Path("tiny/stage1.toml")  # a suffix means a file, never a shipped name
    with pytest.raises(FileNotFoundError):
        load_recipe("tiny/stage1.toml")
    with pytest.raises(FileNotFoundError, match="--recipes takes a folder"):
        recipe_folder(tmp_path / "no_such_folder")
