"""Packaging: ``kernels/`` is installed as ``hiera_fast.kernels`` and never shadows another distribution's top-level
``kernels`` (Hugging Face's hub kernels, which transformers >= 5 imports), from a checkout's root or anywhere else."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest

import hiera_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_hiera_fast_kernels_is_the_checkouts_folder():
    import hiera_fast.kernels
    import hiera_fast.kernels.attention_fwd

    assert os.path.dirname(os.path.realpath(hiera_fast.kernels.__file__)) == os.path.realpath(KERNELS)
    assert hiera_fast.kernels.attention_fwd.__name__ == "hiera_fast.kernels.attention_fwd"


def _import_kernels(path0: str, hide_site_packages: bool = False) -> subprocess.CompletedProcess:
    """``import kernels`` in a fresh interpreter whose ``sys.path[0]`` is ``path0`` (as ``python -m pytest`` or
    ``python -c`` run there have it); prints the module's file, or the error."""
    code = ("import sys\n"
            f"sys.path.insert(0, {path0!r})\n"
            + ("sys.path = [p for p in sys.path if 'site-packages' not in p]\n" if hide_site_packages else "")
            + "try:\n    import kernels\nexcept ImportError as err:\n    print('ImportError', err)\n"
              "else:\n    print(kernels.__file__)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=path0, check=True)


@pytest.mark.skipif(not _hub_kernels_installed(), reason="Hugging Face's kernels is not installed (transformers >= 5 "
                                                          "brings it)")
def test_top_level_kernels_is_hugging_faces_from_the_root():
    """With the checkout's root first on ``sys.path``, ``import kernels`` is the installed distribution, and
    transformers' hub-kernels integration imports it in this test process (the root is on ``sys.path`` here too)."""
    out = _import_kernels(ROOT).stdout.strip()
    assert "site-packages" in out and not out.startswith(ROOT), out
    import kernels

    assert not os.path.realpath(kernels.__file__).startswith(os.path.realpath(KERNELS))
    from transformers.integrations import hub_kernels  # imports `kernels` when it is available

    assert hub_kernels.is_kernels_available()
    from kernels import get_kernel  # noqa: F401  (Hugging Face's API, not our folder)


def test_top_level_kernels_without_the_distribution_is_not_our_folder():
    """Without another ``kernels`` installed, ``import kernels`` from the root fails as if our folder were not
    there, saying what the folder is."""
    out = _import_kernels(ROOT, hide_site_packages=True).stdout.strip()
    assert out.startswith("ImportError") and "hiera_fast.kernels" in out, out


def test_wheel_holds_hiera_fast_kernels_and_no_top_level_kernels(tmp_path):
    """``setup.py`` maps ``kernels/`` to ``hiera_fast.kernels``: the wheel has no top-level ``kernels``."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools here")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), ROOT], capture_output=True, text=True)
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("hiera_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__", "attention_fwd", "attention_bwd", "max_pool", "unrolled_layout"):
        assert f"hiera_fast/kernels/{module}.py" in names
    tops = {name.split("/")[0] for name in names}
    assert tops == {"hiera_fast", f"hiera_fast-{hiera_fast.__version__}.dist-info"}, tops


def test_a_missing_peer_fails_in_ci_and_skips_elsewhere(monkeypatch):
    """The parity tests import their peers through ``helpers.peer``: with ``CI=true`` a missing peer is an error
    (a parity suite that silently skips proves nothing), on a user's machine a skip with the reason."""
    import importlib

    from helpers import peer

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError("gone")) if name == "timm" else real(name))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError, match="CI=true: the parity tests need timm"):
        peer("timm")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="timm is not installed"):
        peer("timm")
