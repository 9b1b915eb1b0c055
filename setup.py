"""Build script: the pure-Python/Triton package, plus the CUDA extension from csrc/ once it exists.

All metadata lives in pyproject.toml; this file only decides about native extensions.
"""
from setuptools import setup

setup()
