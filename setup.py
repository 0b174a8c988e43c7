"""Packages: everything under hf_kd/, plus the top-level model_cards/ folder shipped as hf_kd.model_cards
(mapped in pyproject.toml), so that an installed hf_kd renders model cards without the source checkout."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["hf_kd*"]), "hf_kd.model_cards"])
