"""Where the source families live: ``shortquant/families/`` (one module per family).

This folder is kept as the place people look for converters; the code is inside the package so
that it installs under ``shortquant`` instead of a top-level ``converters`` name other packages use.
"""

from shortquant.families import FAMILIES, find_family, make_model_plan  # noqa: F401
