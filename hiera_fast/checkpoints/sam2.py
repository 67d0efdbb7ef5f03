"""Checkpoints of SAM 2's Hiera trunk: the key maps of the official ``sam2``, ultralytics, timm and transformers
formats (all here), reading them, and writing a transformers ``Sam2HieraDetModel`` directory.

Our names are the official trunk's. Where each format keeps the trunk, and how its names differ:

- official ``sam2`` (``sam2.1_hiera_*.pt``): ``{"model": state}``, trunk under ``image_encoder.trunk.``; a bare
  ``Hiera`` state dict has no prefix. ultralytics' ``sam2*_*.pt`` are the same format (its ``build.py`` loads them
  with ``state["model"]`` into a ``SAM2Model`` whose modules are named as the official ones).
- timm ``hieradet_sam2`` (``sam2_hiera_*``): no prefix; ``mlp.fc1`` / ``mlp.fc2`` for ``mlp.layers.0`` /
  ``mlp.layers.1``, and a ``head`` (``head.norm``, ``head.fc``) that is not part of SAM 2's trunk (dropped).
- transformers: ``Sam2Model`` under ``vision_encoder.backbone.``, ``Sam2VisionModel`` under ``backbone.``,
  ``Sam2HieraDetModel`` bare; ``patch_embed.projection``, ``layer_norm1`` / ``layer_norm2``, ``mlp.proj_in`` /
  ``mlp.proj_out``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
from typing import Any

import torch

from ..sam2.config import PRESETS, HieraDetConfig, preset_key

# prefixes under which a whole model's state dict keeps the trunk (official / ultralytics SAM2Base, transformers
# Sam2Model and Sam2VisionModel)
_TRUNK_PREFIXES = ("image_encoder.trunk.", "vision_encoder.backbone.", "backbone.")
_TIMM = {"mlp.fc1.": "mlp.layers.0.", "mlp.fc2.": "mlp.layers.1."}
_TRANSFORMERS = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "mlp.proj_in.": "mlp.layers.0.",
                 "mlp.proj_out.": "mlp.layers.1."}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json")


# ------------------------------------------------------------------------------------------------ key maps
def checkpoint_format(state: dict[str, torch.Tensor]) -> str:
    """``'sam2'`` (official and ultralytics), ``'timm'`` or ``'transformers'``, judged from a trunk's keys."""
    keys = list(state)
    if any(k.startswith("patch_embed.projection.") or ".layer_norm1." in k or ".mlp.proj_in." in k for k in keys):
        return "transformers"
    if any(".mlp.fc1." in k for k in keys):
        return "timm"
    if any(k.startswith("patch_embed.proj.") or ".mlp.layers.0." in k for k in keys):
        return "sam2"
    raise ValueError("unrecognised SAM 2 Hiera checkpoint: expected official/ultralytics (blocks.*.mlp.layers.*), "
                     "timm (blocks.*.mlp.fc1.*) or transformers (patch_embed.projection.*) trunk keys, got e.g. "
                     f"{keys[:5]}")


def trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk's part of a state dict, without its prefix: a whole SAM 2 model's ``image_encoder.trunk.*`` (official,
    ultralytics) or ``vision_encoder.backbone.*`` / ``backbone.*`` (transformers); a trunk's own keys as they are. A
    timm ``features_only`` wrapper's ``model.`` prefix is dropped too."""
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    for prefix in _TRUNK_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        key = key.replace(f".{old}", f".{new}")
    return key


def to_hieradet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported checkpoint (a whole SAM 2 model's or a trunk's) → our (the official trunk's) names."""
    state = trunk_state(state)
    fmt = checkpoint_format(state)
    if fmt == "sam2":
        return state
    if fmt == "timm":
        if any(".ls1." in k or ".ls2." in k for k in state):
            raise ValueError("this timm HieraDet has layer scale (init_values, e.g. hieradet_small): not a SAM 2 "
                             "trunk, and not supported")
        if any(k.startswith("head.fc.") for k in state):
            warnings.warn("hiera_fast: timm's classifier head (head.norm, head.fc) is not part of SAM 2's trunk: "
                          "dropped", stacklevel=3)
        return {_rename(k, _TIMM): v for k, v in state.items() if not k.startswith("head.")}
    out = {}
    for k, v in state.items():
        k = k.replace("patch_embed.projection.", "patch_embed.proj.", 1)
        out[_rename(k, _TRANSFORMERS)] = v
    return out


def to_transformers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → transformers' ``Sam2HieraDetModel`` names (the inverse of :func:`to_hieradet_keys`)."""
    inverse = {new: old for old, new in _TRANSFORMERS.items()}
    out = {}
    for k, v in state.items():
        k = k.replace("patch_embed.proj.", "patch_embed.projection.", 1)
        out[_rename(k, inverse)] = v
    return out


def guess_config(state: dict[str, torch.Tensor]) -> HieraDetConfig:
    """The preset whose trunk has ``state``'s shapes (our names): widths, blocks per stage, ``pos_embed`` and
    ``pos_embed_window`` sizes. SAM 2.0 and 2.1 trunks are the same, so the 2.1 name is returned."""
    try:
        embed_dim = state["patch_embed.proj.weight"].shape[0]
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        pos, window = tuple(state["pos_embed"].shape[2:]), state["pos_embed_window"].shape[2]
    except KeyError as err:
        raise ValueError(f"the checkpoint has no {err} key: not a SAM 2 Hiera trunk") from err
    starts = [i for i in blocks if f"blocks.{i}.proj.weight" in state]  # the first blocks of stages 2..
    bounds = [0, *starts, len(blocks)]
    stages = tuple(b - a for a, b in itertools.pairwise(bounds))
    for name, preset in PRESETS.items():
        config = HieraDetConfig(**preset)
        if (config.embed_dim, config.stages, config.window_pos_embed_bkg_spatial_size, config.window_spec[0]) == \
                (embed_dim, stages, pos, window) and name.startswith("sam2.1"):
            return config
    raise ValueError(f"the checkpoint's trunk (embed_dim {embed_dim}, stages {stages}, pos_embed {pos}, "
                     f"pos_embed_window {window}) matches no SAM 2 preset: pass config= (a HieraDetConfig)")


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load our-named ``state`` into ``model``; anything missing, unexpected or of the wrong shape is an error that
    lists the keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError("checkpoint does not fit the model (is the config right?):"
                         + (f"\n  missing: {missing}" if missing else "")
                         + (f"\n  unexpected: {unexpected}" if unexpected else "")
                         + (f"\n  wrong shape: {wrong}" if wrong else ""))
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ files
def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _resolve(source: str | os.PathLike) -> str:
    path = os.fspath(source)
    if os.path.exists(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) is None or path.endswith(_SUFFIXES):
        raise FileNotFoundError(f"{path!r} is neither a local file/directory nor a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["config.json", "*.safetensors", "*.json", "*.bin"])
    except Exception as err:  # offline, unknown repo: one clear message
        raise OSError(f"{path!r} is not a local file or directory, and fetching it as a Hugging Face hub id failed "
                      f"({type(err).__name__}: {err}). Pass a local directory or checkpoint file instead.") from err


def config_from_json(raw: dict) -> HieraDetConfig:
    """The trunk's config from a ``config.json`` beside the weights: transformers' (``model_type`` ``sam2``,
    ``sam2_vision_model`` or ``sam2_hiera_det_model``) or timm's (``architecture`` names a ``sam2_hiera_*`` model)."""
    if "architecture" in raw and "model_type" not in raw:
        if preset_key(str(raw["architecture"])) is None:
            raise ValueError(f"timm config.json: architecture {raw['architecture']!r} is not a SAM 2 Hiera")
        return HieraDetConfig.from_preset(str(raw["architecture"]))
    if "model_type" not in raw:
        raise ValueError("config.json is neither transformers' (model_type) nor timm's (architecture)")
    return HieraDetConfig.from_transformers_dict(raw)


def load_checkpoint(source: Any) -> tuple[dict[str, torch.Tensor], HieraDetConfig | None]:
    """(state dict as stored, the transformers config found beside it or None) from an in-memory state dict (or
    ``{"model": state}``), a checkpoint file, a directory or a hub id."""
    if isinstance(source, dict):
        state = source["model"] if isinstance(source.get("model"), dict) else source
        return dict(state), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a hub id or a state dict, got {type(source).__name__}")
    path = _resolve(source)
    if os.path.isfile(path):
        return _read_file(path), None
    config = None
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            config = config_from_json(json.load(f))
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return _read_file(os.path.join(path, name)), config
    for name in _SHARD_INDEXES:
        index = os.path.join(path, name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_file(os.path.join(path, shard)))
            return state, config
    raise FileNotFoundError(f"no weights in {path!r}: expected one of {_WEIGHT_FILES + _SHARD_INDEXES}")


def from_pretrained(cls, source: Any, config: HieraDetConfig | str | None, fused: bool):
    """:meth:`HieraDetModel.from_pretrained`."""
    raw, found = load_checkpoint(source)
    state = to_hieradet_keys(raw)
    if isinstance(config, str):
        if preset_key(config) is None:
            raise ValueError(f"unknown SAM 2 preset {config!r}; choose from {sorted(PRESETS)}")
        config = HieraDetConfig.from_preset(config)
    elif config is None:
        config = found or guess_config(state)
    elif not isinstance(config, HieraDetConfig):
        raise TypeError(f"config must be a HieraDetConfig, a preset name or None, got {type(config).__name__}")
    model = cls(config, fused=fused)
    load_state_dict_checked(model, state)
    return model


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """:meth:`HieraDetModel.save_pretrained`: a transformers ``Sam2HieraDetModel`` directory."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    data = {**model.config.to_transformers_dict(), "architectures": ["Sam2HieraDetModel"],
            "dtype": str(model.dtype).removeprefix("torch.")}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in to_transformers_keys(model.state_dict()).items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
