"""The examples in docstrings run and give what they show (like ``--doctest-modules``).

Every module of the package that has an example is collected, so a new module's examples are
tested without being listed here. Examples that would need a big or absent file say
``# doctest: +SKIP``; the rest run on the embedded demo model.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import converters
import shortquant


def _modules_with_examples() -> list[str]:
    names = []
    for package in (shortquant, converters):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if info.ispkg and info.name.endswith(".models"):
                continue   # the demo model and recipes: data, no code
            source = info.module_finder.find_spec(info.name).origin
            if source and source.endswith(".py") and ">>>" in open(source, encoding="utf-8").read():
                names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_the_known_examples_are_collected():
    for name in ("shortquant.naming", "shortquant.quant.mixes", "shortquant.source.checkpoint", "shortquant.recipes"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    for test in finder.find(module):
        result = runner.run(test, out=failures.append)
        assert result.failed == 0, f"{test.name}:\n{''.join(failures)}"
