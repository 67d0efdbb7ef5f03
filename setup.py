"""Build script: which packages the distribution holds and where their sources live (metadata: pyproject.toml).

``pip install -e .``, ``pip install .`` and ``python -m build`` all run it through setuptools' build backend.

``kernels/`` sits at the top of the repository, beside ``hiera_fast/``, and is installed as ``hiera_fast.kernels``:
never as a top-level ``kernels`` module, a name that belongs to Hugging Face's ``kernels`` distribution, which
transformers >= 5 imports. (Where a checkout's root is on ``sys.path``, ``kernels/__init__.py`` hands that name over
to the installed distribution.)
"""

from setuptools import find_packages, setup

setup(
    packages=["hiera_fast", *(f"hiera_fast.{name}" for name in find_packages("hiera_fast")), "hiera_fast.kernels"],
    package_dir={"hiera_fast": "hiera_fast", "hiera_fast.kernels": "kernels"},
)
