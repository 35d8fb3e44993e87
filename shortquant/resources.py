"""Where the files shipped beside the code are (the embedded demo model, the recipes) and where
shortquant keeps what it caches (:func:`cache_root`).

They live in the repository's top-level ``models/`` folder, which the build installs as the
package ``shortquant.models`` (``setup.py`` maps the folder). Reading them through
``importlib.resources`` finds them the same way in a wheel, a plain ``pip install .`` and an
editable install, from any working directory.

    >>> (demo_model() / "config.json").is_file()
    True
    >>> recipes_dir().name
    'recipes'
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEMO_RECIPE = "shortquant-demo"


def models_dir() -> Path:
    """The installed ``models/`` folder (``shortquant.models``)."""
    try:
        root = resources.files("shortquant.models")
    except ModuleNotFoundError:
        # A source checkout imported without installing (PYTHONPATH=.): models/ beside the package.
        return Path(__file__).resolve().parents[1] / "models"
    # Installs unpack to disk; the demo's weights are read as plain files, not through a zip.
    return Path(str(root))


def demo_model() -> Path:
    """The embedded demo model's checkpoint folder."""
    return models_dir() / "demo"


def recipes_dir() -> Path:
    """The folder of recipe files, one JSON file per known release."""
    return models_dir() / "recipes"


def is_demo_model(path: Path) -> bool:
    """Whether ``path`` is the embedded demo model's folder (by identity, not by name)."""
    demo = demo_model()
    try:
        return demo.is_dir() and Path(path).is_dir() and Path(path).samefile(demo)
    except OSError:
        return False


def cache_root() -> Path:
    """Where shortquant caches (base log-probs, built llama.cpp tools): ``$SHORTQUANT_CACHE``, else
    ``$XDG_CACHE_HOME/shortquant``, else ``~/.cache/shortquant``."""
    return Path(os.environ.get("SHORTQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shortquant"))
