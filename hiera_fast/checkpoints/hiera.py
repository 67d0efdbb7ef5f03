"""Loading and saving checkpoints: transformers directories, official ``.pth`` / hub-mixin directories, timm state
dicts and Hugging Face hub ids.

Our modules are named like transformers' Hiera, so its checkpoints load as they are (after the ``hiera.`` prefix
is placed for the target class) and :meth:`PretrainedMixin.save_pretrained` writes a directory transformers can
read. Official and timm keys are renamed by :func:`official_to_transformers_keys`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch

from ..config import HieraConfig

# Parts of a checkpoint that belong to one task's head: dropped (with a warning) when the target model has none,
# and left at their initialisation (with a warning) when the checkpoint has none.
_HEAD_PREFIXES = ("classifier.", "pooler.", "encoder_norm.", "multiscale_fusion.", "decoder.", "hidden_states_norms.")
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # transformers' sharded saves
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json")
_BLOCK_RENAMES = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after."}
# the official Hiera / MaskedAutoencoderHiera constructor arguments (its hub-mixin config.json holds the ones passed)
_OFFICIAL_ARGS = {"input_size", "in_chans", "embed_dim", "num_heads", "num_classes", "stages", "q_pool", "q_stride",
                  "mask_unit_size", "mask_unit_attn", "dim_mul", "head_mul", "patch_kernel", "patch_stride",
                  "patch_padding", "mlp_ratio", "drop_path_rate", "norm_layer", "head_dropout", "head_init_scale",
                  "sep_pos_embed", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"}


# ------------------------------------------------------------------------------------------------ key maps
def _block_key(rest: str) -> str:
    for old, new in _BLOCK_RENAMES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def official_to_transformers_keys(state: dict[str, torch.Tensor], config: HieraConfig) -> dict[str, torch.Tensor]:
    """Rename official (``hiera`` package) or timm keys to our/transformers' names (without the ``hiera.`` prefix);
    timm differs only in its head (``head.fc``, ``head.norm``)."""
    where = [(stage, layer) for stage, depth in enumerate(config.depths) for layer in range(depth)]
    fixed = {
        "pos_embed": "embeddings.position_embeddings",
        "pos_embed_spatial": "embeddings.position_embeddings_spatial",
        "pos_embed_temporal": "embeddings.position_embeddings_temporal",
        "mask_token": "decoder.mask_token",
        "decoder_pos_embed": "decoder.decoder_position_embeddings",
    }
    prefixes = [
        ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
        ("head.projection.", "classifier."), ("head.fc.", "classifier."),
        ("head.norm.", "pooler.layernorm."), ("norm.", "pooler.layernorm."),
        ("encoder_norm.", "encoder_norm."),
        ("multi_scale_fusion_heads.", "multiscale_fusion.multi_scale_fusion_heads."),
        ("decoder_embed.", "decoder.decoder_embeddings."), ("decoder_norm.", "decoder.decoder_norm."),
        ("decoder_pred.", "decoder.decoder_pred."),
    ]
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        if m := re.match(r"blocks\.(\d+)\.(.*)", key):
            i = int(m.group(1))
            if i >= len(where):
                raise ValueError(f"checkpoint has block {i} but the config has {len(where)} blocks (depths "
                                 f"{config.depths}); pass the matching config=")
            stage, layer = where[i]
            out[f"encoder.stages.{stage}.layers.{layer}.{_block_key(m.group(2))}"] = value
            continue
        if m := re.match(r"decoder_blocks\.(\d+)\.(.*)", key):
            out[f"decoder.decoder_block.layers.{m.group(1)}.{_block_key(m.group(2))}"] = value
            continue
        for old, new in prefixes:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            out[key] = value  # unknown: reported as unexpected by load_state_dict_checked
    return out


def checkpoint_format(state: dict[str, torch.Tensor]) -> str:
    """'transformers', 'official' or 'timm', judged from the keys."""
    keys = list(state)
    if any(".stages." in k or k.startswith(("embeddings.", "hiera.")) for k in keys):
        return "transformers"
    if any(k.startswith(("head.fc.", "head.norm.")) for k in keys):
        return "timm"
    if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return "official"
    raise ValueError("unrecognised checkpoint: expected transformers (encoder.stages.*), official (blocks.*) or "
                     f"timm (head.fc.*) keys, got e.g. {keys[:5]}")


def to_base_keys(state: dict[str, torch.Tensor], config: HieraConfig) -> dict[str, torch.Tensor]:
    """Any supported checkpoint → transformers' names without the ``hiera.`` prefix. A timm ``features_only`` model's
    keys (``model.blocks.*``: the wrapped model's) lose their ``model.`` prefix."""
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    fmt = checkpoint_format(state)
    if fmt == "transformers":
        return {k.removeprefix("hiera."): v for k, v in state.items()}
    return official_to_transformers_keys(state, config)


def official_config_to_hiera_config(cfg: dict[str, Any]) -> HieraConfig:
    """The official ``Hiera``/``MaskedAutoencoderHiera`` constructor arguments (hub-mixin ``config.json``)."""
    stages = tuple(cfg.get("stages", (2, 3, 16, 3)))
    heads, head_mul = [cfg.get("num_heads", 1)], cfg.get("head_mul", 2.0)
    dims, dim_mul = [cfg.get("embed_dim", 96)], cfg.get("dim_mul", 2.0)
    for _ in stages[1:]:  # the official model rounds at every stage: int(int(h * m) * m), not int(h * m**2)
        heads.append(int(heads[-1] * head_mul))
        dims.append(int(dims[-1] * dim_mul))
    # it reads mask_unit_attn[stage] and pools after at most len(stages) - 1 stages: a 3-stage model takes the
    # first 3 of the default 4 flags, and q_pool=3 pools twice
    mask_unit_attn = tuple(cfg.get("mask_unit_attn", (True, True, False, False)))[: len(stages)]
    q_pool = min(cfg.get("q_pool", 3), len(stages) - 1)
    kwargs = dict(
        embed_dim=dims[0], image_size=cfg.get("input_size", (224, 224)),
        num_channels=cfg.get("in_chans", 3), num_labels=cfg.get("num_classes", 1000), depths=stages,
        num_heads=tuple(heads), num_query_pool=q_pool,
        query_stride=cfg.get("q_stride", (2, 2)), masked_unit_size=cfg.get("mask_unit_size", (8, 8)),
        masked_unit_attention=mask_unit_attn,
        embed_dim_multiplier=cfg.get("dim_mul", 2.0), patch_size=cfg.get("patch_kernel", (7, 7)),
        patch_stride=cfg.get("patch_stride", (4, 4)), patch_padding=cfg.get("patch_padding", (3, 3)),
        mlp_ratio=cfg.get("mlp_ratio", 4.0), drop_path_rate=cfg.get("drop_path_rate", 0.0),
        sep_pos_embed=cfg.get("sep_pos_embed", False),
    )
    if "decoder_embed_dim" in cfg or "decoder_depth" in cfg:
        kwargs.update(decoder_hidden_size=cfg.get("decoder_embed_dim", 512), decoder_depth=cfg.get("decoder_depth", 8),
                      decoder_num_heads=cfg.get("decoder_num_heads", 16))
    config = HieraConfig(**kwargs)
    if config.stage_dims != dims:
        raise ValueError(f"the official model's stage widths {dims} (embed_dim {dims[0]}, dim_mul {dim_mul}, rounded "
                         f"at every stage) differ from HieraConfig's {config.stage_dims} (embed_dim * dim_mul**stage, "
                         "as transformers computes them): this dim_mul is not supported")
    return config


def config_from_timm(data: dict[str, Any]) -> HieraConfig:
    """timm's hub ``config.json``: the preset named by ``architecture`` with timm's ``model_args`` applied."""
    name = str(data["architecture"]).split(".")[0]  # "hiera_base_224.mae_in1k_ft_in1k" -> "hiera_base_224"
    args = dict(data.get("model_args") or {})
    renames = {"num_classes": "num_labels", "img_size": "image_size", "in_chans": "num_channels",
               "drop_path_rate": "drop_path_rate"}
    unknown = sorted(k for k in args if k not in renames and not (k == "global_pool" and args[k] == "avg"))
    if unknown:
        raise ValueError(f"timm model_args {unknown} of {name!r} are not supported")
    kwargs = {renames[k]: v for k, v in args.items() if k in renames}
    kwargs.setdefault("num_labels", data.get("num_classes", 1000))
    return HieraConfig.from_preset(name, **kwargs)  # an unknown architecture raises there


def config_from_json(raw: dict[str, Any]) -> HieraConfig:
    """A ``config.json`` of transformers (``model_type``), timm (``architecture``) or the official hub mixin (only
    the constructor arguments that were passed, so possibly none of ``stages``, ``q_pool``, ...)."""
    if "architecture" in raw and "model_type" not in raw:
        return config_from_timm(raw)
    if "model_type" in raw:
        return HieraConfig.from_dict(raw)
    unknown = sorted(set(raw) - _OFFICIAL_ARGS)
    if unknown:
        raise ValueError(f"config.json is not a Hiera config of transformers (model_type), timm (architecture) or the "
                         f"official package (constructor arguments): unknown keys {unknown}")
    return official_config_to_hiera_config(raw)


# ------------------------------------------------------------------------------------------------ files
def _read_state_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model_state", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _resolve_source(source: str | os.PathLike) -> str:
    """A local file or directory, or a hub id downloaded with huggingface_hub."""
    path = os.fspath(source)
    if os.path.exists(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) is None or path.endswith(_CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"{path!r} is neither a local file/directory nor a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["config.json", "*.safetensors", "*.bin", "*.pth"])
    except Exception as err:  # offline, unknown repo, no network: one clear message
        raise OSError(f"{path!r} is not a local file or directory, and fetching it as a Hugging Face hub id failed "
                      f"({type(err).__name__}: {err}). Offline? Pass a local directory or checkpoint file instead."
                      ) from err


def load_checkpoint(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], HieraConfig | None]:
    """(state dict, config found beside it or None) from a directory, a checkpoint file or a hub id."""
    path = _resolve_source(source)
    if os.path.isfile(path):
        return _read_state_file(path), None
    weights = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    indexes = [os.path.join(path, f) for f in _SHARD_INDEXES if os.path.isfile(os.path.join(path, f))]
    if not weights and not indexes:
        raise FileNotFoundError(f"no weights in {path!r}: expected one of {_WEIGHT_FILES + _SHARD_INDEXES}")
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            raw = json.load(f)
        config = config_from_json(raw)
    if weights:
        return _read_state_file(weights[0]), config
    return _read_shards(indexes[0]), config


def _read_shards(index_path: str) -> dict[str, torch.Tensor]:
    """A sharded transformers checkpoint: the shards its index file's ``weight_map`` names, merged."""
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_state_file(os.path.join(os.path.dirname(index_path), shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{index_path} lists tensors that its shards do not hold: {missing[:5]}")
    return state


def _head(key: str, prefix: str) -> str | None:
    """The task head (one of :data:`_HEAD_PREFIXES`) a model key belongs to, or None for the encoder."""
    base = key.removeprefix(prefix)
    return next((p for p in _HEAD_PREFIXES if base.startswith(p)), None)


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load base-named ``state`` into ``model``. A task head only one side has is dropped (the checkpoint's) or left
    initialised (the model's), with a warning; a classifier of another size is replaced, with a warning. A head both
    have must match key for key (an MAE decoder of another depth is an error), as must the encoder: anything missing,
    unexpected or of the wrong shape is an error listing the keys."""
    prefix = getattr(model, "_checkpoint_prefix", "")
    state = {(prefix + k if k.startswith(_ENCODER_PREFIXES) else k): v for k, v in state.items()}
    own = model.state_dict()
    own_heads = {_head(k, prefix) for k in own} - {None}
    state_heads = {_head(k, prefix) for k in state} - {None}
    dropped = [k for k in state if _head(k, prefix) in state_heads - own_heads]
    resized = [k for k in state if k in own and k.startswith("classifier.") and state[k].shape != own[k].shape]
    for k in dropped + resized:
        state.pop(k)
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    initialised = [k for k in missing if _head(k, prefix) in own_heads - state_heads
                   or (k.startswith("classifier.") and resized)]
    missing = [k for k in missing if k not in initialised]
    if unexpected or missing or wrong:
        raise ValueError("checkpoint does not fit the model (is the config right?):"
                         + (f"\n  missing: {missing}" if missing else "")
                         + (f"\n  unexpected: {unexpected}" if unexpected else "")
                         + (f"\n  wrong shape: {wrong}" if wrong else ""))
    if dropped or resized:
        warnings.warn(f"hiera_fast: checkpoint keys of another head dropped: {sorted(dropped + resized)}", stacklevel=3)
    if initialised:
        warnings.warn(f"hiera_fast: head weights not in the checkpoint, left initialised: {sorted(initialised)}",
                      stacklevel=3)
    model.load_state_dict(state, strict=False)


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for the model classes (which set ``_checkpoint_prefix``)."""

    _checkpoint_prefix = ""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, config: HieraConfig | str | None = None,
                        fused: bool = False):
        """Build and load a model from ``source``: a transformers directory (config.json + safetensors/.bin), an
        official checkpoint file (``{"model_state": ...}``) or hub-mixin directory, a timm state dict file, or a
        Hugging Face hub id. A bare state-dict file needs ``config=`` (a HieraConfig or a preset name such as
        ``"hiera_base_224"``); with a preset name the number of classes is the checkpoint's classifier's (a model
        fine-tuned to 10 classes loads as one), with a HieraConfig it is the config's (another size is replaced by a
        new classifier, with a warning)."""
        state, found = load_checkpoint(source)
        if isinstance(config, str):
            preset = config
            config = HieraConfig.from_preset(preset)
            head = to_base_keys(state, config).get("classifier.weight")
            if head is not None and head.dim() == 2 and head.shape[0] != config.num_labels:
                config = HieraConfig.from_preset(preset, num_labels=head.shape[0])
        config = config or found
        if config is None:
            raise ValueError(f"{os.fspath(source)!r} holds no config.json: pass config= (a HieraConfig or a preset "
                             f"name such as 'hiera_base_224')")
        if not isinstance(config, HieraConfig):
            raise TypeError(f"config must be a HieraConfig or a preset name, got {type(config).__name__}")
        model = cls(config, fused=fused)
        load_state_dict_checked(model, to_base_keys(state, config))
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` that this class and transformers (image models) can read."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        extra = {**self.config.extra, "architectures": [type(self).__name__]}
        dtype = next((str(p.dtype).removeprefix("torch.") for p in self.parameters() if p.is_floating_point()), None)
        if dtype is not None:  # the weights' dtype, not the one of the checkpoint this model was loaded from
            extra["dtype"] = dtype
            if "torch_dtype" in extra:  # transformers 4.x's name
                extra["torch_dtype"] = dtype
        self.config.extra = extra
        self.config.save_pretrained(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
