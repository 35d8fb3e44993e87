"""Packaging beyond what pyproject.toml can say: the top-level ``models/`` folder (the demo model
and the recipes) is installed as the package ``shortquant.models``, so wheels and plain installs
carry it; ``shortquant.resources`` reads it from there."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["shortquant*", "converters*"]) + ["shortquant.models"],
    package_dir={"shortquant.models": "models"},
)
