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

from .config import HieraConfig

# Parts of a checkpoint that belong to one task's head: dropped (with a warning) when the target model has none,
# and left at their initialisation (with a warning) when the checkpoint has none.
_HEAD_PREFIXES = ("classifier.", "pooler.", "encoder_norm.", "multiscale_fusion.", "decoder.", "hidden_states_norms.")
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
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
    """Any supported checkpoint → transformers' names without the ``hiera.`` prefix."""
    fmt = checkpoint_format(state)
    if fmt == "transformers":
        return {k.removeprefix("hiera."): v for k, v in state.items()}
    return official_to_transformers_keys(state, config)


def official_config_to_hiera_config(cfg: dict[str, Any]) -> HieraConfig:
    """The official ``Hiera``/``MaskedAutoencoderHiera`` constructor arguments (hub-mixin ``config.json``)."""
    stages = tuple(cfg.get("stages", (2, 3, 16, 3)))
    heads, head_mul = cfg.get("num_heads", 1), cfg.get("head_mul", 2.0)
    kwargs = dict(
        embed_dim=cfg.get("embed_dim", 96), image_size=cfg.get("input_size", (224, 224)),
        num_channels=cfg.get("in_chans", 3), num_labels=cfg.get("num_classes", 1000), depths=stages,
        num_heads=tuple(int(heads * head_mul**i) for i in range(len(stages))), num_query_pool=cfg.get("q_pool", 3),
        query_stride=cfg.get("q_stride", (2, 2)), masked_unit_size=cfg.get("mask_unit_size", (8, 8)),
        masked_unit_attention=cfg.get("mask_unit_attn", (True, True, False, False)),
        embed_dim_multiplier=cfg.get("dim_mul", 2.0), patch_size=cfg.get("patch_kernel", (7, 7)),
        patch_stride=cfg.get("patch_stride", (4, 4)), patch_padding=cfg.get("patch_padding", (3, 3)),
        mlp_ratio=cfg.get("mlp_ratio", 4.0), drop_path_rate=cfg.get("drop_path_rate", 0.0),
        sep_pos_embed=cfg.get("sep_pos_embed", False),
    )
    if "decoder_embed_dim" in cfg or "decoder_depth" in cfg:
        kwargs.update(decoder_hidden_size=cfg.get("decoder_embed_dim", 512), decoder_depth=cfg.get("decoder_depth", 8),
                      decoder_num_heads=cfg.get("decoder_num_heads", 16))
    return HieraConfig(**kwargs)


def config_from_json(raw: dict[str, Any]) -> HieraConfig:
    """A ``config.json`` of transformers (``model_type``), timm (``architecture``) or the official hub mixin (only
    the constructor arguments that were passed, so possibly none of ``stages``, ``q_pool``, ...)."""
    if "model_type" in raw or "architecture" in raw:
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
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) is None:
        raise FileNotFoundError(f"{path!r} is neither a local file/directory nor a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["config.json", "*.safetensors", "*.bin", "*.pth"])
    except Exception as err:  # offline, unknown repo, no network: one clear message
        raise OSError(f"could not fetch {path!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                      "Offline? Pass a local directory or checkpoint file instead.") from err


def load_checkpoint(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], HieraConfig | None]:
    """(state dict, config found beside it or None) from a directory, a checkpoint file or a hub id."""
    path = _resolve_source(source)
    if os.path.isfile(path):
        return _read_state_file(path), None
    weights = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not weights:
        raise FileNotFoundError(f"no weights in {path!r}: expected one of {_WEIGHT_FILES}")
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            raw = json.load(f)
        config = config_from_json(raw)
    return _read_state_file(weights[0]), config


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load base-named ``state`` into ``model``; task heads may be dropped or left initialised (warned), anything
    else missing, unexpected or of the wrong shape is an error listing the keys."""
    prefix = getattr(model, "_checkpoint_prefix", "")
    state = {(prefix + k if k.startswith(_ENCODER_PREFIXES) else k): v for k, v in state.items()}
    own = model.state_dict()
    dropped = [k for k in state if k not in own and k.removeprefix(prefix).startswith(_HEAD_PREFIXES)]
    resized = [k for k in state if k in own and k.startswith("classifier.") and state[k].shape != own[k].shape]
    for k in dropped + resized:
        state.pop(k)
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    initialised = [k for k in missing if k.removeprefix(prefix).startswith(_HEAD_PREFIXES)]
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
        ``"hiera_base_224"``)."""
        state, found = load_checkpoint(source)
        if isinstance(config, str):
            config = HieraConfig.from_preset(config)
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
        self.config.extra = {**self.config.extra, "architectures": [type(self).__name__]}
        self.config.save_pretrained(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
