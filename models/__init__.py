"""The demo model and the recipes, installed as the package ``shortquant.models`` (see setup.py).

Read them through :mod:`shortquant.resources`, never by a path relative to the source tree.
"""
