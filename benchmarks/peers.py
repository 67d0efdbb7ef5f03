"""Every implementation a benchmark row can time: ours (``hiera_fast.bench``) and the peers, each eager or compiled.

An implementation is ``base[+mode]`` (``hiera_fast.bench.split_impl``). Bases: ours, ``eager`` (``fused=False``) and
``fused``; the peers, built with the same weights as ours (through the checkpoint key maps):

- ``transformers``: ``HieraForImageClassification`` / ``HieraForPreTraining``;
- ``official``: the ``hiera`` package (PyPI ``hiera-transformer``); its MAE forward with ``mask_ratio``;
- ``timm``: ``timm.models.hiera`` (image classifiers only);
- ``hiera-optim``: ``hiera_optim.optimize`` on the official model; with a CUDA-graph mode its best documented setting,
  ``optimize(model, graph_safe=True)`` with its static mask buffers (``MAEStepInputs``, refreshed before each step,
  outside the graphs);
- ``vit``: timm's ``vit_base_patch16_224`` (its own random init, 1000 classes): the reference users compare Hiera
  with. For a ``mae_`` preset its training row is a *supervised* ViT-B/16 classification step (cross-entropy on fixed
  random labels; timm has no MAE ViT), at the same batch and dtype.

Modes (``hiera_fast.bench.COMPILE_MODES``): ``compile`` (default), ``cudagraphs`` (reduce-overhead),
``max-autotune``, ``max-autotune-no-cudagraphs``. A peer that cannot be built here raises
``hiera_fast.bench.Unavailable`` with the reason (the suites skip the row with it).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch
from torch import nn

from hiera_fast import bench
from hiera_fast.bench import Unavailable
from hiera_fast.config import HieraConfig

PEER_BASES = ("transformers", "official", "timm", "hiera-optim", "vit")
MAE_MASK_RATIO = 0.6  # the presets' (and the official model's default)


def _state_for_peer(peer: nn.Module, ours: dict[str, torch.Tensor], config: HieraConfig) -> dict:
    """Our (transformers-named) weights renamed to an official/timm model's keys, via the key map the loader uses."""
    from hiera_fast.checkpoints.hiera import official_to_transformers_keys

    base = {k.removeprefix("hiera."): v for k, v in ours.items()}
    names = official_to_transformers_keys({k: k for k in peer.state_dict()}, config)  # ours -> theirs
    missing = [k for k in names if k not in base]
    if missing:
        raise Unavailable(f"weights do not map onto the peer model (e.g. {missing[:3]})")
    return {theirs: base[k] for k, theirs in names.items()}


def _alias_mae_symbols() -> None:
    """hiera-optim 0.2.1 is written against the FAIR repository's layout: it looks up ``MaskedAutoencoderHiera`` and
    ``apply_fusion_head`` in ``hiera.hiera`` when it is imported (PyPI's hiera-transformer 0.1.4 defines them in
    ``hiera.hiera_mae``; without them its adapter matches no model), and its patched forward reads
    ``model._grad_checkpointing`` (set in :func:`_hiera_optim`)."""
    module, mae = importlib.import_module("hiera.hiera"), importlib.import_module("hiera.hiera_mae")
    for name in ("MaskedAutoencoderHiera", "apply_fusion_head"):
        if not hasattr(module, name) and hasattr(mae, name):
            setattr(module, name, getattr(mae, name))


def _official_model(name: str):
    try:
        with warnings.catch_warnings():  # it imports timm.models.layers (deprecated)
            warnings.simplefilter("ignore", FutureWarning)
            import hiera
    except ImportError as err:
        raise Unavailable(f"the official package is not installed (pip install hiera-transformer): {err}") from None
    ctor = getattr(hiera, bench.preset_key(name), None)
    if ctor is None:
        raise Unavailable(f"the official package has no {bench.preset_key(name)}")
    model = ctor(pretrained=False)
    model.load_state_dict(_state_for_peer(model, bench.reference_state(name), bench.preset_config(name)))
    return model


def _official(name, device, dtype, train, mode):
    model = _official_model(name).to(device=device, dtype=dtype).train(train)
    if bench.is_mae(name):
        return model, lambda m, x: m(x, mask_ratio=MAE_MASK_RATIO)[0], None, "", None
    # the official head applies softmax in eval (a few us); train mode returns logits
    return model, lambda m, x: m(x), _ce(name), "", None


def _hiera_optim(name, device, dtype, train, mode):
    _alias_mae_symbols()
    try:
        import hiera_optim
    except ImportError:
        raise Unavailable("hiera-optim is not installed (pip install hiera-optim)") from None
    model = _official_model(name)
    graph_safe = mode is not None and bench.uses_cuda_graphs(f"x+{mode}")
    try:
        hiera_optim.optimize(model, verbose=False, **({"graph_safe": True} if graph_safe else {}))
    except Exception as err:  # a peer's failure is a skip with its reason, not a crash of our suite
        raise Unavailable(f"hiera_optim.optimize failed: {type(err).__name__}: {err}") from None
    if not hasattr(model, "_grad_checkpointing"):
        model._grad_checkpointing = False
    model = model.to(device=device, dtype=dtype).train(train)
    note = "hiera_optim.optimize(official model)" + (" with graph_safe=True and its static mask buffers"
                                                      if graph_safe else "") + ", two compatibility shims"
    if not bench.is_mae(name):
        return model, lambda m, x: m(x), _ce(name), note, None
    if not graph_safe:
        return model, lambda m, x: m(x, mask_ratio=MAE_MASK_RATIO)[0], None, note, None
    buffers: dict[tuple, object] = {}  # MAEStepInputs per batch shape: the mask and keep_idx CUDA graphs replay

    def step_inputs(x):
        if x.shape not in buffers:
            buffers[x.shape] = hiera_optim.MAEStepInputs(model, batch_size=x.shape[0], in_chans=x.shape[1],
                                                          input_size=tuple(x.shape[2:]), mask_ratio=MAE_MASK_RATIO,
                                                          device=x.device, dtype=x.dtype)
        return buffers[x.shape]

    def call(m, x):
        inputs = step_inputs(x)
        return m(x, mask_ratio=MAE_MASK_RATIO, mask=inputs.mask, keep_idx=inputs.keep_idx)[0]

    def refresh():
        for inputs in buffers.values():
            inputs.refresh_mask()  # outside the captured graphs, as hiera-optim's recipe does

    return model, call, None, note, refresh


def _transformers(name, device, dtype, train, mode):
    try:
        import transformers
    except ImportError as err:
        raise Unavailable(f"transformers is not installed: {err}") from None
    config = bench.preset_config(name)
    if config.spatial_dims == 3:
        raise Unavailable("transformers' Hiera has no video model")
    tconfig = transformers.HieraConfig.from_dict(config.to_dict())
    mae = bench.is_mae(name)
    model = (transformers.HieraForPreTraining if mae else transformers.HieraForImageClassification)(tconfig)
    model.load_state_dict(bench.reference_state(name))
    model = model.to(device=device, dtype=dtype).train(train)
    if mae:
        return model, lambda m, x: m(pixel_values=x).loss, None, "", None
    return model, lambda m, x: m(pixel_values=x).logits, _ce(name), "", None


def _timm(name, device, dtype, train, mode):
    try:
        import timm
    except ImportError as err:
        raise Unavailable(f"timm is not installed: {err}") from None
    config = bench.preset_config(name)
    if bench.is_mae(name) or config.spatial_dims == 3:
        raise Unavailable("timm's Hiera has image classifiers only (no MAE, no video)")
    try:
        model = timm.create_model(bench.preset_key(name), pretrained=False, num_classes=config.num_labels)
    except RuntimeError as err:  # unknown model name in this timm version
        raise Unavailable(f"timm has no {bench.preset_key(name)}: {err}") from None
    model.load_state_dict(_state_for_peer(model, bench.reference_state(name), config))
    model = model.to(device=device, dtype=dtype).train(train)
    return model, lambda m, x: m(x), _ce(name), "", None


def _vit(name, device, dtype, train, mode):
    try:
        import timm
    except ImportError as err:
        raise Unavailable(f"timm is not installed: {err}") from None
    config = bench.preset_config(name)
    if config.spatial_dims == 3 or tuple(config.image_size) != (224, 224):
        raise Unavailable("the ViT-B/16 reference row is for 224² image presets")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
    model = model.to(device=device, dtype=dtype).train(train)
    note = "timm vit_base_patch16_224, its own random init" + (
        "; a supervised classification step (timm has no MAE ViT)" if bench.is_mae(name) else "")
    return model, lambda m, x: m(x), bench.cross_entropy_on_fixed_labels(1000), note, None


def _ce(name: str):
    return bench.cross_entropy_on_fixed_labels(bench.preset_config(name).num_labels)


_BUILDERS = {"transformers": _transformers, "official": _official, "timm": _timm, "hiera-optim": _hiera_optim,
             "vit": _vit}


def build_variant(name: str, impl: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
                  train: bool = False, compile_backend: str | None = None) -> bench.Variant:
    """``impl`` of preset ``name`` (ours or a peer, eager or compiled) on ``device``; ``dtype`` casts the weights
    (inference), None keeps fp32 (training under autocast); ``compile_backend`` as in
    ``hiera_fast.bench.compiled_variant``. Raises Unavailable with the reason."""
    device = torch.device(device)
    base, mode = bench.split_impl(impl)
    if base in bench.OUR_BASES:
        return bench.build_variant(name, impl, device, dtype, train=train, compile_backend=compile_backend)
    if base not in _BUILDERS:
        raise ValueError(f"unknown implementation {impl!r}; bases: {', '.join(bench.OUR_BASES + PEER_BASES)}")
    model, call, loss, note, before_step = _BUILDERS[base](name, device, dtype, train, mode)
    return bench.compiled_variant(impl, model, call, loss, device, note, before_step, compile_backend)


def is_peer(impl: str) -> bool:
    return bench.split_impl(impl)[0] in PEER_BASES
