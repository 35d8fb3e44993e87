"""A wheel carries the demo model and the recipes: installed outside the source tree (a fresh
venv, run from an unrelated folder), `shortquant export` with no source, `--recipe` and
`shortquant recipes` work, and `inspect` gives the demo the same plan with or without its path.

The venv gets the wheel by ``pip install`` with its dependencies resolved offline (no index)
against the packages of the environment running the tests (what the README's install put there,
linked into the venv's path; the source tree's own editable shortquant left out), so a requirement
the wheel declares and nothing satisfies fails here. That environment may itself be a venv: its
packages, not the base interpreter's, are the ones linked.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from shortquant import keys
from shortquant.recipes import list_recipes, load_recipe

REPO = Path(__file__).resolve().parents[1]
# What a build needs: the files an sdist would carry.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "shortquant", "converters", "models")

pytestmark = pytest.mark.slow


def _run(args, cwd, env=None):
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python, shortquant script, environment, working folder) of a venv holding only the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:   # a copy, so the in-tree build leaves nothing in the repository
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", root / "dist", src], cwd=root, env=env)
    wheel = next((root / "dist").glob("shortquant-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root)
    python = root / "venv" / "bin" / "python"
    _link_running_packages(root / "deps", python)
    # pip (one of the linked packages) installs into the venv (sys.prefix); nothing outside it changes.
    _run([python, "-m", "pip", "install", "--no-index", "-q", wheel], cwd=root, env=env)
    work = root / "work"
    work.mkdir()
    return python, root / "venv" / "bin" / "shortquant", env, work


def _link_running_packages(deps: Path, python: Path) -> None:
    """Put the running environment's installed packages, except shortquant's own, on ``python``'s
    path: each entry of its site-packages linked into ``deps``, which a ``.pth`` file adds."""
    deps.mkdir()
    for folder in map(Path, site.getsitepackages()):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.name.lower().startswith(("shortquant", "__editable__")) or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "running-environment.pth").write_text(f"{deps}\n")


def test_installed_package_reads_its_own_copy(venv):
    python, _, env, work = venv
    done = _run([python, "-c", "import shortquant.resources as r; print(r.__file__); print(r.demo_model())"],
                cwd=work, env=env)
    module, demo = done.stdout.split()
    prefix = str(python.parents[1])
    assert module.startswith(prefix) and demo.startswith(prefix), done.stdout
    assert (Path(demo) / "model.safetensors").is_file()


def test_export_with_no_source_writes_the_demo(venv):
    _, shortquant, env, work = venv
    _run([shortquant, "export", "-q", "q8_0", "--out", "out", "--quiet"], cwd=work, env=env)
    files = list((work / "out").glob("*.gguf"))
    assert len(files) == 1 and files[0].name.startswith("Shortquant-Demo-") and files[0].name.endswith("-Q8_0.gguf")
    recipe = load_recipe("shortquant-demo")
    reader = gguf.GGUFReader(files[0])
    assert reader.get_field(keys.RECIPE).contents() == "shortquant-demo"
    assert reader.get_field(keys.SOURCE_BLOCKS).contents() == list(recipe.kept_blocks)
    assert reader.get_field("llama.block_count").contents() == recipe.block_count


def test_recipes_are_listed_and_usable_by_name(venv):
    python, shortquant, env, work = venv
    listed = _run([shortquant, "recipes"], cwd=work, env=env).stdout
    names = [r.name for r in list_recipes()]
    assert len(names) >= 7 and all(name in listed for name in names)
    # --recipe NAME on a copy of the demo under another name: read from the installed recipe file.
    demo = _run([python, "-c", "import shortquant.resources as r; print(r.demo_model())"], cwd=work, env=env)
    copy = work / "my-model"
    shutil.copytree(demo.stdout.strip(), copy)
    plain = _run([shortquant, "inspect", copy.name], cwd=work, env=env).stdout
    with_recipe = _run([shortquant, "inspect", copy.name, "--recipe", "shortquant-demo"], cwd=work, env=env).stdout
    removed = load_recipe("shortquant-demo").removed_blocks
    assert f"removed original blocks: {list(removed)}" in with_recipe
    assert "removed original blocks" not in plain


def test_inspect_demo_with_and_without_its_path(venv):
    python, shortquant, env, work = venv
    demo = _run([python, "-c", "import shortquant.resources as r; print(r.demo_model())"], cwd=work, env=env)
    bare = _run([shortquant, "inspect"], cwd=work, env=env).stdout
    by_path = _run([shortquant, "inspect", demo.stdout.strip()], cwd=work, env=env).stdout
    assert by_path == bare
    assert "shortquant-demo" in bare
