"""Triton kernels for Hiera, installed as ``hiera_fast.kernels``.

Pure tensor functions: no ``torch.nn``, no model knowledge. ``hiera_fast.ops`` is the only caller.

This folder sits at the top of a checkout, so wherever the checkout's root is on ``sys.path`` (``python -m pytest``
or ``python -c`` run there) ``import kernels`` would find it and shadow the ``kernels`` distribution that
transformers >= 5 imports (Hugging Face's hub kernels). Imported under any name but ``hiera_fast.kernels``, this
module hands the name over to the next ``kernels`` found past the checkout (:func:`_hand_over`), or fails as if
the folder were not there.
"""

import sys


def _hand_over(name: str, checkout: str) -> None:
    """Load the package ``name`` from the first importer that is not this checkout, into ``sys.modules[name]``
    (where the import statement now importing us picks it up); ModuleNotFoundError if there is none. Only a
    regular package or module counts: a namespace portion never shadowed anything."""
    import importlib.machinery
    import importlib.util
    import os

    def outside(entry: str) -> bool:
        return os.path.realpath(entry or os.curdir) != checkout

    spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if outside(p)])
    for finder in sys.meta_path:  # editable installs and other importers
        if spec is None and finder is not importlib.machinery.PathFinder and hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
            if spec is not None and spec.origin and not outside(os.path.dirname(os.path.dirname(spec.origin))):
                spec = None  # that importer maps the name onto this folder again
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r} (the kernels/ folder of the hiera-fast checkout "
                                  f"{checkout} is the package hiera_fast.kernels, not a top-level {name!r})",
                                  name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


if "." not in __name__:  # a top-level import: ``import kernels`` with the checkout on sys.path
    import os as _os

    _hand_over(__name__, _os.path.realpath(_os.path.dirname(_os.path.dirname(__file__))))
