"""The shared machinery of the drop-in patch: find a library's Hiera modules, give them a fused ``forward``, undo it.

Two ways in, as in Liger-Kernel's ``monkey_patch.py``:

- **instances** (:func:`patch`): every matching module of an existing model gets a new class: a subclass of its
  library class, made once per class, that overrides ``forward`` with the fused function and ``extra_repr`` with a
  tag (so ``repr(model)`` shows the patch). Nothing is stored on the instance (parameters, buffers, hooks, its
  ``__dict__`` and the state dict are untouched) and :func:`unpatch` puts the library class back. Since the patch
  lives in the class, a ``copy.deepcopy`` stays patched and an ``nn.DataParallel`` replica (a shallow copy of the
  ``__dict__``) runs the fused forward on its own weights; pickling writes the library class, so a model saved with
  ``torch.save(model)`` loads unpatched, without needing hiera_fast.
- **classes** (:func:`patch_class`, behind ``patch_transformers()`` & co.): the class attribute ``forward`` is
  replaced, so every instance — built before or after — runs the fused function until the undo.

Each target library is described by a :class:`Library` (module path, class names, the attributes the fused forward
reads, the fused functions). Classes are found by import and ``hasattr``; a layout we do not know raises an error
that names the library and its version. A library that has not been imported cannot own a module of the model, so
:func:`patch` never imports one (``import hiera_fast`` stays light).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .. import ops

LIBRARY_CLASS = "_hiera_fast_library_class"  # on our patched subclasses: the library class they patch
_SUBCLASSES: dict[type, type] = {}  # library class -> its patched subclass
_MISSING = object()
_CLASS_SAVED: dict[tuple[type, str], object] = {}  # (class, name) -> previous class-dict entry or _MISSING
_CHECKED: set[type] = set()  # classes whose instances have every attribute a fused forward reads


# ------------------------------------------------------------------------------------------------ library specs
@dataclasses.dataclass(frozen=True)
class Role:
    """One patchable class of a library: its name, the attributes the fused forward reads, and the fused functions.

    ``applies(module)`` says whether an instance runs fused code when patched (a block only where it pools with a
    stride > 1);
    ``needs(module)`` lists extra attributes that only some instances must have (a pooling block's ``proj``).
    """

    class_name: str
    attrs: tuple[str, ...]
    forward: Callable
    tag: str
    applies: Callable[[nn.Module], bool] = lambda module: True
    needs: Callable[[nn.Module], tuple[str, ...]] = lambda module: ()


@dataclasses.dataclass(frozen=True)
class Library:
    """A target library: where its Hiera lives (``module``), its distribution name (for the version), its roles.

    ``match_by_name=False`` where the roles' class names are not the library's Hiera's alone (timm's
    ``MultiScaleBlock`` is also MViTv2's and CrossViT's): its modules are then found by class only, never reported as
    an unknown layout for their name. ``block_with_attention``: the block role carries the attention (SAM 2's windowed
    blocks run their attention inside the block), so ``attention=True`` patches it; else ``pooling=True`` does (Hiera's
    pooled residual).
    """

    name: str
    module: str
    distribution: str
    attention: Role
    block: Role
    match_by_name: bool = True
    block_with_attention: bool = False

    @property
    def root(self) -> str:
        return self.module.split(".")[0]

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return getattr(sys.modules.get(self.root), "__version__", "unknown version")

    def describe(self) -> str:
        return f"{self.name} {self.version()} ({self.distribution})"

    def qualname(self, role: Role) -> str:
        return f"{self.module}.{role.class_name}"

    def roles(self, attention: bool, pooling: bool) -> list[Role]:
        block = attention if self.block_with_attention else pooling
        return [role for role, on in ((self.attention, attention), (self.block, block)) if on]

    def check(self, module: nn.Module, role: Role, cached: bool = True) -> None:
        """Raise if ``module`` lacks an attribute the fused forward reads. The fused forwards call it first (so a
        class patched before any instance existed is checked on its first call), cached per class since a layout
        belongs to a library version; :func:`patch` checks every instance. While ``torch.compile`` traces, the
        check runs at trace time without the cache: a set read and changed in traced code is a guard that the next
        call fails (a recompile)."""
        compiling = torch.compiler.is_compiling()
        if cached and not compiling and type(module) in _CHECKED:
            return
        missing = [a for a in role.attrs if not hasattr(module, a)]
        missing += [a for a in role.needs(module) if getattr(module, a, None) is None]
        if missing:
            raise RuntimeError(f"hiera_fast.patch: {self.describe()}'s {role.class_name} has no attribute(s) "
                               f"{missing}; this layout is not supported")
        if not compiling:
            _CHECKED.add(type(module))

    def classes(self, *, import_module: bool) -> dict[str, type] | None:
        """``{class_name: class}`` for both roles; None if the module is not imported (and ``import_module`` is off).

        Raises:
            ImportError: the library is not installed (only with ``import_module``).
            RuntimeError: the module or a class is missing, or a class has no ``forward`` (an unknown layout).
        """
        if not import_module and self.module not in sys.modules:
            return None  # not imported, so no model holds its modules (or it moved: _targets tells by class name)
        try:
            mod = importlib.import_module(self.module)
        except ImportError as err:
            if importlib.util.find_spec(self.root) is None:
                raise ImportError(f"hiera_fast.patch: {self.name} is not installed ({self.distribution})") from err
            raise RuntimeError(f"hiera_fast.patch: {self.describe()} has no module {self.module}; this layout is "
                               f"not supported (known: {self.qualname(self.attention)})") from err
        found = {}
        for role in (self.attention, self.block):
            cls = getattr(mod, role.class_name, None)
            if not isinstance(cls, type) or not hasattr(cls, "forward"):
                raise RuntimeError(f"hiera_fast.patch: {self.describe()}'s {self.module} has no class "
                                   f"{role.class_name} with a forward; this layout is not supported")
            found[role.class_name] = cls
        return found


LIBRARIES: list[Library] = []  # filled by the per-library modules


def register(library: Library) -> Library:
    LIBRARIES.append(library)
    return library


def looked_for() -> str:
    return ", ".join(lib.qualname(role) for lib in LIBRARIES for role in (lib.attention, lib.block))


# ------------------------------------------------------------------------------------------------ originals
def original(module: nn.Module, name: str) -> Callable:
    """The library's own ``module.<name>``, bound: found up the class hierarchy, skipping our patched subclass and
    any class-level patch of ours."""
    for klass in type(module).__mro__:
        if name not in klass.__dict__ or LIBRARY_CLASS in klass.__dict__:
            continue
        fn = _CLASS_SAVED.get((klass, name), klass.__dict__[name])
        if fn is _MISSING:  # we added it to a class that had none of its own: look further up
            continue
        return fn.__get__(module, type(module))
    raise AttributeError(f"{type(module).__name__} has no attribute {name!r}")


def _tagged_extra_repr(role: Role) -> Callable[[nn.Module], str]:
    def extra_repr(self: nn.Module) -> str:
        base = original(self, "extra_repr")()
        if not role.applies(self):  # a class-level patch also reaches blocks that run the library's own code
            return base
        return f"{base}, {role.tag}" if base else role.tag

    return extra_repr


def _library_class(module: nn.Module) -> type:
    """``type(module)``, or the library class it was before :func:`patch` gave it our subclass."""
    return type(module).__dict__.get(LIBRARY_CLASS, type(module))


def _fused_role(module: nn.Module) -> Role | None:
    """The role whose fused forward ``module`` has (by instance or class patch), or None."""
    forward = getattr(type(module), "forward", None)
    return next((role for lib in LIBRARIES for role in (lib.attention, lib.block) if role.forward is forward), None)


def _runs_fused(module: nn.Module) -> bool:
    role = _fused_role(module)
    return role is not None and role.applies(module)


def _require_module(model: object, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"hiera_fast.{name} expects a torch.nn.Module, got {type(model).__name__}")


# ------------------------------------------------------------------------------------------------ instances
def fused_attention(module: nn.Module, x: torch.Tensor, num_heads: int, q_stride: int) -> torch.Tensor:
    """The body every library's patched attention shares: its ``qkv`` Linear → the fused op → its ``proj``.

    ``num_heads``/``q_stride`` are passed in because the libraries name them differently; ``window_size`` and
    ``use_mask_unit_attn`` are named alike in all three.
    """
    qkv = module.qkv(x)  # [B, N, 3 * dim_out]
    out = ops.mask_unit_attention(qkv, num_heads, q_stride, module.window_size, module.use_mask_unit_attn,
                                  fused=True)  # [B, N // q_stride, dim_out]
    return module.proj(out)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` or any module in it runs fused code, patched by instance or by class: an attention module,
    or a block that pools its residual with a stride > 1 (the other blocks run the library's own code)."""
    _require_module(model, "is_patched")
    return any(_runs_fused(module) for module in model.modules())


def _patched_class(cls: type, role: Role) -> type:
    """``cls`` with the fused ``forward`` and a tagged ``extra_repr``; made once per class and cached."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    class Patched(cls):
        forward = role.forward
        extra_repr = _tagged_extra_repr(role)

        def __reduce_ex__(self, protocol):
            # pickled as the library class (what copyreg.__newobj__ would do for it): torch.save(model) loads
            # unpatched, and without hiera_fast
            return cls.__new__, (cls,), self.__getstate__()

        def __deepcopy__(self, memo):
            # as copy.deepcopy does through __reduce_ex__, but keeping the patched class
            clone = memo[id(self)] = type(self).__new__(type(self))
            clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
            return clone

    Patched.__name__, Patched.__qualname__ = cls.__name__, cls.__qualname__  # repr(model) names the library class
    setattr(Patched, LIBRARY_CLASS, cls)
    _SUBCLASSES[cls] = Patched
    return Patched


def _overrides_forward(module: nn.Module, cls: type) -> bool:
    """A subclass of ``cls`` with a forward of its own: not ours to patch."""
    return _library_class(module).forward is not cls.forward


def _targets(model: nn.Module, attention: bool, pooling: bool) -> tuple[list[tuple[nn.Module, Role]], int]:
    """The modules of ``model`` to patch, and how many Hiera attention/block modules of a known library it holds."""
    libs, layout_errors = [], {}
    for lib in LIBRARIES:
        try:
            classes = lib.classes(import_module=False)
        except RuntimeError as err:  # imported, but not a layout we know: an error only if the model uses it
            layout_errors[lib.name] = err
            continue
        if classes:
            libs.append((lib, classes))
    by_name = {(lib.root, role.class_name): lib for lib in LIBRARIES if lib.match_by_name
               for role in (lib.attention, lib.block)}
    out, hiera_modules = [], 0
    for module in model.modules():
        known = False
        for lib, classes in libs:
            for role in (lib.attention, lib.block):
                cls = classes[role.class_name]
                if not isinstance(module, cls):
                    continue
                known = True
                if _overrides_forward(module, cls):
                    continue
                hiera_modules += 1
                if role in lib.roles(attention, pooling):
                    lib.check(module, role, cached=False)
                    if role.applies(module):
                        out.append((module, role))
        lib = by_name.get((type(module).__module__.split(".")[0], type(module).__name__))
        if lib is not None and not known:
            if lib.name in layout_errors:
                raise layout_errors[lib.name]
            raise RuntimeError(f"hiera_fast.patch: {type(module).__module__}.{type(module).__name__} is named like "
                               f"{lib.name}'s Hiera, but hiera_fast knows {lib.qualname(lib.attention)} and "
                               f"{lib.qualname(lib.block)}; {lib.describe()} is not supported")
    if hiera_modules == 0 and layout_errors:
        raise RuntimeError("; ".join(str(err) for err in layout_errors.values()))
    return out, hiera_modules


def patch_modules(model: nn.Module, *, attention: bool = True, pooling: bool = True) -> list[nn.Module]:
    """Patch ``model``'s Hiera modules in place; returns the modules this call patched (none if already patched)."""
    _require_module(model, "patch")
    if not (attention or pooling):
        raise ValueError("hiera_fast.patch: attention=False and pooling=False leaves nothing to patch")
    targets, hiera_modules = _targets(model, attention, pooling)
    if hiera_modules == 0:
        raise ValueError(f"hiera_fast.patch: {type(model).__name__} holds no Hiera attention or block module; "
                         f"looked for {looked_for()} (hiera_fast's own models take fused=True instead)")
    done = []
    for module, role in targets:
        if _fused_role(module) is None:  # else patched already, by instance or by class
            module.__class__ = _patched_class(type(module), role)
            done.append(module)
    return done


def unpatch_modules(modules: list[nn.Module] | Iterator[nn.Module]) -> int:
    """Undo the instance patches of ``modules`` (others are skipped); returns how many were restored."""
    count = 0
    for module in modules:
        if LIBRARY_CLASS in type(module).__dict__:
            module.__class__ = _library_class(module)
            count += 1
    return count


def patch(model: nn.Module, *, attention: bool = True, pooling: bool = True) -> nn.Module:
    """Put the fused Triton kernels into a transformers, timm or official Hiera model, in place.

    Every ``MaskUnitAttention`` (transformers: ``HieraMaskUnitAttention``) runs
    ``proj(hiera_fast.ops.mask_unit_attention(qkv(x), ..., fused=True))`` (``attention=True``), and every block that
    pools its residual runs ``hiera_fast.ops.unrolled_max_pool(proj(x_norm), q_stride, fused=True)`` in place of
    ``x.view(B, q_stride, -1, C).max(1)`` (``pooling=True``); everything else in the block is the library's own.
    SAM 2 trunks (official ``sam2``, timm, transformers, ultralytics), with ``attention=True``: every windowed block
    runs its attention as ``proj(hiera_fast.ops.window_attention(qkv(x_norm), qkv.bias, ..., fused=True))`` on the
    unpadded BHWC map (padding, window partition, query pooling and unpartition inside the kernels), and global
    attention runs SDPA on views; their pooled residual stays PyTorch's ``max_pool2d``.
    Parameters and the state dict are untouched; patching twice is a no-op; :func:`unpatch` undoes it.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` holds no Hiera module of a known library (the message lists the classes looked for).
        RuntimeError: a library's Hiera has a layout this version of hiera_fast does not know (names the version).
    """
    patch_modules(model, attention=attention, pooling=pooling)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` (a no-op where nothing is patched). Class-level patches stay; undo those
    with ``unpatch_transformers()`` & co."""
    _require_module(model, "unpatch")
    unpatch_modules(model.modules())
    return model


@contextlib.contextmanager
def patched(model: nn.Module, *, attention: bool = True, pooling: bool = True) -> Iterator[nn.Module]:
    """``with patched(model): ...`` runs the fused kernels inside the block; modules that were patched before it
    stay patched after it."""
    done = patch_modules(model, attention=attention, pooling=pooling)
    try:
        yield model
    finally:
        unpatch_modules(done)


# ------------------------------------------------------------------------------------------------ classes
def patch_class(cls: type, role: Role) -> bool:
    """Replace ``cls.forward`` and ``cls.extra_repr``; False if already done."""
    if (cls, "forward") in _CLASS_SAVED:
        return False
    for name, fn in (("forward", role.forward), ("extra_repr", _tagged_extra_repr(role))):
        _CLASS_SAVED[(cls, name)] = cls.__dict__.get(name, _MISSING)
        setattr(cls, name, fn)
    return True


def unpatch_class(cls: type) -> bool:
    """Undo :func:`patch_class`; False if ``cls`` was not patched."""
    if (cls, "forward") not in _CLASS_SAVED:
        return False
    for name in ("forward", "extra_repr"):
        previous = _CLASS_SAVED.pop((cls, name))
        if previous is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, previous)
    return True


def patch_library(library: Library, attention: bool, pooling: bool) -> None:
    if not (attention or pooling):
        raise ValueError(f"hiera_fast.patch_{library.name}: attention=False and pooling=False leaves nothing to patch")
    classes = library.classes(import_module=True)
    for role in library.roles(attention, pooling):
        patch_class(classes[role.class_name], role)


def unpatch_library(library: Library) -> None:
    for cls in {cls for cls, _ in _CLASS_SAVED if cls.__module__ == library.module}:
        unpatch_class(cls)
