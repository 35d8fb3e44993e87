"""Shipped files (demo model, recipes) are found through the package, and the demo is the demo
however its folder is named on the command line."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from shortquant.cli import main
from shortquant.recipes import list_recipes
from shortquant.resources import demo_model, is_demo_model, recipes_dir

DEMO = demo_model()


def test_demo_and_recipes_are_found():
    assert (DEMO / "config.json").is_file() and (DEMO / "model.safetensors").is_file()
    assert {p.stem for p in recipes_dir().glob("*.json")} == {r.name for r in list_recipes()}
    assert "shortquant-demo" in {r.name for r in list_recipes()}


def _inspect(*args):
    result = CliRunner().invoke(main, ["inspect", *args])
    assert result.exit_code == 0, result.output
    return result


def test_inspect_demo_with_or_without_its_path_gives_the_same_plan(monkeypatch):
    bare = _inspect().stdout
    assert "original indices: from recipe shortquant-demo" in bare
    assert "removed original blocks: [4, 6]" in bare
    monkeypatch.chdir(DEMO.parent)
    for spelling in (str(DEMO), DEMO.name, f"./{DEMO.name}/", f"../{DEMO.parent.name}/{DEMO.name}"):
        result = _inspect(spelling)
        assert result.stdout == bare, spelling
        assert "using recipe shortquant-demo" in result.stderr
    as_json = json.loads(_inspect(DEMO.name, "--json").stdout)
    assert as_json == json.loads(_inspect("--json").stdout)


def test_a_copy_named_demo_is_not_the_demo(tmp_path):
    copy = shutil.copytree(DEMO, tmp_path / DEMO.name)
    assert is_demo_model(DEMO) and not is_demo_model(copy) and not is_demo_model(tmp_path / "missing")
    result = _inspect(str(copy))   # identity, not name: a copy needs --recipe shortquant-demo
    assert "original indices: unknown" in result.stdout and "using recipe" not in result.stderr
