"""HieraConfig: transformers' field names and defaults, plus 3-D (video) sizes and the official model zoo presets."""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence


def _as(kind: type, v: Any) -> int | bool | None:
    """``v`` as an int (an integral number, not a bool: 8 or 8.0) or a bool (True / False, or 0 / 1); None if it is
    not one (1.9, "false", None, ...): such values are errors, never rounded or read by truthiness."""
    if kind is bool:
        return bool(v) if isinstance(v, bool) or (isinstance(v, numbers.Integral) and v in (0, 1)) else None
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and float(v).is_integer()):
        return int(v)
    return None


def _scalar(value: Any, name: str, kind: type = int) -> int | bool:
    converted = _as(kind, value)
    if converted is None:
        raise ValueError(f"HieraConfig.{name} must be {'an int' if kind is int else 'a bool'}, got {value!r}")
    return converted


def _tuple(value: Any, name: str, kind: type = int) -> tuple:
    if isinstance(value, (numbers.Number, str)) or not isinstance(value, Iterable):
        raise ValueError(f"HieraConfig.{name} must be a sequence, got {value!r}")
    converted = tuple(_as(kind, v) for v in value)
    if any(v is None for v in converted):
        raise ValueError(f"HieraConfig.{name} must be a sequence of {kind.__name__}, got {value!r}")
    return converted


def unrolled_window_shape(query_stride: Sequence[int], unrolls: int, size: int) -> tuple[int, ...] | None:
    """The block of tokens that a mask-unit window of ``size`` tokens covers after ``unrolls`` unrolls by
    ``query_stride``, or None if such a window is not a block within ``query_stride**unrolls``.

    Unroll orders a token's index by digits, most significant first: its offset inside the finest stride (y before
    x), then inside the next coarser one, ..., then its position on the coarse grid. MaskUnitAttention's window is
    the tokens with one ``n % num_windows``: the trailing digits are fixed and the leading ones vary, so a window
    is a block only if it spans whole leading digits (``size = 4`` with strides ``(2, 2)``: a 2x2 block).
    """
    shape, n = [1] * len(query_stride), 1
    for _ in range(unrolls):
        for i, q in enumerate(query_stride):
            if n < size:
                shape[i], n = shape[i] * q, n * q
    return tuple(shape) if n == size else None


# transformers' problem types of an image classifier (None: from the labels, per call)
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass
class HieraConfig:
    """Hyper-parameters of a Hiera model, named as in ``transformers.HieraConfig``.

    Sizes are 2-D ``(H, W)`` for images or 3-D ``(T, H, W)`` for video; every spatial field
    (``image_size``, ``patch_size``, ``patch_stride``, ``patch_padding``, ``query_stride``,
    ``masked_unit_size``) must have the same length. ``sep_pos_embed`` selects separate spatial and temporal
    position embeddings, as the official video models use. An impossible configuration raises ``ValueError``
    naming the field when it is constructed.

    ``masked_unit_size`` must be a block that the unroll keeps together: ``query_stride**m`` per dim for some
    ``m <= len(depths) - 1`` (or one stride level further in the leading dims, e.g. ``(8, 4)``); see
    :func:`unrolled_window_shape`. Dropping mask units (MAE, ``bool_masked_pos``) also needs
    ``masked_unit_size == query_stride**(len(depths) - 1)`` (:attr:`supports_masking`).

    ``masked_unit_attention[s]`` is read as the official model does: stage ``s``'s first block takes the previous
    stage's flag, its other blocks their own (transformers differs when a stage turns it back on: such a
    ``config.json`` warns in :meth:`from_dict`). ``problem_type`` picks the classifier's loss as in transformers
    (None: from the labels).
    """

    embed_dim: int = 96
    image_size: Sequence[int] = (224, 224)
    patch_size: Sequence[int] = (7, 7)
    patch_stride: Sequence[int] = (4, 4)
    patch_padding: Sequence[int] = (3, 3)
    mlp_ratio: float = 4.0
    depths: Sequence[int] = (2, 3, 16, 3)
    num_heads: Sequence[int] = (1, 2, 4, 8)
    embed_dim_multiplier: float = 2.0
    num_query_pool: int = 3
    query_stride: Sequence[int] = (2, 2)
    masked_unit_size: Sequence[int] = (8, 8)
    masked_unit_attention: Sequence[bool] = (True, True, False, False)
    drop_path_rate: float = 0.0
    num_channels: int = 3
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_init: float = 1.0
    layer_norm_eps: float = 1e-6
    decoder_hidden_size: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    normalize_pixel_loss: bool = True
    mask_ratio: float = 0.6
    out_features: list[str] | None = None
    out_indices: list[int] | None = None
    num_labels: int = 1000
    problem_type: str | None = None
    sep_pos_embed: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "patch_stride", "patch_padding", "query_stride", "masked_unit_size",
                     "depths", "num_heads"):
            setattr(self, name, _tuple(getattr(self, name), name))
        self.masked_unit_attention = _tuple(self.masked_unit_attention, "masked_unit_attention", bool)
        for name in ("embed_dim", "num_query_pool", "num_channels", "num_labels"):
            setattr(self, name, _scalar(getattr(self, name), name))
        for name in ("decoder_hidden_size", "decoder_depth", "decoder_num_heads"):
            if getattr(self, name) is not None:
                setattr(self, name, _scalar(getattr(self, name), name))
        for name in ("normalize_pixel_loss", "sep_pos_embed"):
            setattr(self, name, _scalar(getattr(self, name), name, bool))
        self._validate()
        self._set_out_features()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        dims = len(self.image_size)
        if dims not in (2, 3):
            raise ValueError(f"HieraConfig.image_size must be 2-D (H, W) or 3-D (T, H, W), got {self.image_size}")
        for name in ("patch_size", "patch_stride", "patch_padding", "query_stride", "masked_unit_size"):
            if len(getattr(self, name)) != dims:
                raise ValueError(f"HieraConfig.{name} must have {dims} entries like image_size, "
                                 f"got {getattr(self, name)}")
        num_stages = len(self.depths)
        if num_stages < 1 or any(d < 1 for d in self.depths):
            raise ValueError(f"HieraConfig.depths must be positive stage depths, got {self.depths}")
        for name in ("num_heads", "masked_unit_attention"):
            if len(getattr(self, name)) != num_stages:
                raise ValueError(f"HieraConfig.{name} needs one entry per stage ({num_stages}), "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.num_query_pool < num_stages:
            raise ValueError(f"HieraConfig.num_query_pool must be in [0, {num_stages - 1}], got {self.num_query_pool}")
        if self.embed_dim < 1 or self.num_channels < 1:
            raise ValueError("HieraConfig.embed_dim and num_channels must be positive")
        if self.num_labels < 0:
            raise ValueError(f"HieraConfig.num_labels must be >= 0 (0: no classifier), got {self.num_labels}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"HieraConfig.problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"HieraConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"HieraConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for name in ("patch_size", "patch_stride", "query_stride", "masked_unit_size"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"HieraConfig.{name} must be positive, got {getattr(self, name)}")
        if min(self.patch_padding) < 0:
            raise ValueError(f"HieraConfig.patch_padding must be >= 0, got {self.patch_padding}")
        for i, (size, stride) in enumerate(zip(self.image_size, self.patch_stride)):
            if size % stride:
                raise ValueError(f"HieraConfig.image_size[{i}]={size} is not divisible by patch_stride[{i}]={stride}")
        for i, (k, s, p) in enumerate(zip(self.patch_size, self.patch_stride, self.patch_padding)):
            if not 0 < k - 2 * p <= s:  # then the conv gives (size + 2p - k) // s + 1 == size // s tokens
                raise ValueError(f"HieraConfig.patch_size[{i}]={k} and patch_padding[{i}]={p} must satisfy 0 < "
                                 f"patch_size - 2 * patch_padding <= patch_stride[{i}]={s} so that the patch "
                                 "embedding gives image_size // patch_stride tokens")
        unrolls = num_stages - 1
        for i, (t, q) in enumerate(zip(self.tokens_spatial_shape, self.query_stride)):
            if t % q**unrolls:
                raise ValueError(f"HieraConfig.image_size[{i}]: the token grid (image_size // patch_stride = {t}) "
                                 f"must be divisible by query_stride[{i}]**{unrolls} = {q**unrolls}")
        mu = self.masked_unit_size
        if unrolled_window_shape(self.query_stride, unrolls, self.flat_mask_unit_size) != mu:
            raise ValueError(f"HieraConfig.masked_unit_size={mu} is not a block of tokens that the unroll keeps "
                             f"together: use query_stride**m per dim for some m <= {unrolls}, e.g. "
                             f"{tuple(q**unrolls for q in self.query_stride)}")
        for s, depth in enumerate(self.depths):
            pools = min(s, self.num_query_pool)
            flags = [self.masked_unit_attention[s - 1 if j == 0 and s > 0 else s] for j in range(depth)]
            if any(flags) and self.flat_mask_unit_size < self.flat_query_stride**pools:
                raise ValueError(f"HieraConfig.masked_unit_attention: stage {s + 1} attends within mask units, but "
                                 f"masked_unit_size={mu} is pooled below one token after {pools} query pools")
        for s, heads in enumerate(self.num_heads):
            dim = self.stage_dims[s]
            if heads < 1 or dim % heads:
                raise ValueError(f"HieraConfig.num_heads[{s}]={heads} must divide stage {s + 1}'s dim {dim}")
        if self.num_query_pool > 0 and math.prod(self.query_stride) > 1:
            for s in range(1, self.num_query_pool + 1):
                if self.stage_dims[s] == self.stage_dims[s - 1]:
                    raise ValueError("HieraConfig.embed_dim_multiplier must change the dim at every pooling stage "
                                     "(the pooled residual goes through a projection)")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"HieraConfig.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.sep_pos_embed and dims != 3:
            raise ValueError("HieraConfig.sep_pos_embed needs 3-D (video) sizes")
        if self.decoder_hidden_size is not None:
            if not (self.decoder_depth and self.decoder_num_heads):
                raise ValueError("HieraConfig.decoder_depth and decoder_num_heads are needed with decoder_hidden_size")
            if min(self.decoder_hidden_size, self.decoder_depth, self.decoder_num_heads) < 1:
                raise ValueError("HieraConfig.decoder_hidden_size, decoder_depth and decoder_num_heads must be "
                                 "positive")
            if self.decoder_hidden_size % self.decoder_num_heads:
                raise ValueError(f"HieraConfig.decoder_num_heads={self.decoder_num_heads} must divide "
                                 f"decoder_hidden_size={self.decoder_hidden_size}")

    def _set_out_features(self) -> None:
        names = self.stage_names
        if self.out_features is None and self.out_indices is None:
            self.out_features, self.out_indices = [names[-1]], [len(names) - 1]
        elif self.out_features is None:
            self.out_indices = self._wrap_out_indices()
            self.out_features = [names[i] for i in self.out_indices]
        else:
            bad = [f for f in self.out_features if f not in names]
            if bad:
                raise ValueError(f"HieraConfig.out_features has unknown stages {bad}; choose from {names}")
            indices = [names.index(f) for f in self.out_features]
            if self.out_indices is not None and self._wrap_out_indices() != indices:
                raise ValueError("HieraConfig.out_features and out_indices disagree")
            self.out_features, self.out_indices = list(self.out_features), indices

    def _wrap_out_indices(self) -> list[int]:
        """``out_indices`` in ``[0, len(stage_names))``; negative ones count from the end, as in transformers."""
        n = len(self.stage_names)
        bad = [i for i in self.out_indices if not -n <= int(i) < n]
        if bad:
            raise ValueError(f"HieraConfig.out_indices {bad} are out of range [-{n}, {n}) of {self.stage_names}")
        return [int(i) % n for i in self.out_indices]

    # ------------------------------------------------------------------ derived geometry
    @property
    def spatial_dims(self) -> int:
        return len(self.image_size)

    @property
    def tokens_spatial_shape(self) -> tuple[int, ...]:
        return tuple(i // s for i, s in zip(self.image_size, self.patch_stride))

    @property
    def stage_dims(self) -> list[int]:
        return [int(self.embed_dim * self.embed_dim_multiplier**i) for i in range(len(self.depths))]

    @property
    def hidden_size(self) -> int:
        return self.stage_dims[-1]

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def flat_query_stride(self) -> int:
        return math.prod(self.query_stride)

    @property
    def flat_mask_unit_size(self) -> int:
        return math.prod(self.masked_unit_size)

    @property
    def supports_masking(self) -> bool:
        """Whether whole mask units can be dropped (MAE, ``bool_masked_pos``). The official code reads mask unit
        ``w`` both as the ``w``-th window of the unrolled layout (token selection, ``Reroll``) and as the ``w``-th
        unit in raster order (masked patch conv, MAE decoder); the two agree only when every unroll level lies
        inside a mask unit, ``masked_unit_size == query_stride**(len(depths) - 1)``."""
        unrolls = len(self.depths) - 1
        return self.masked_unit_size == tuple(q**unrolls for q in self.query_stride)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        """A transformers-compatible ``config.json`` dict (``model_type="hiera"``)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        if not self.sep_pos_embed:
            out.pop("sep_pos_embed")  # transformers' image config has no such field
        extra = dict(self.extra)
        if "id2label" in extra and len(extra["id2label"]) != self.num_labels:
            extra.pop("id2label")
            extra.pop("label2id", None)
        out.update(extra)
        out["model_type"] = "hiera"
        out["hidden_size"] = self.hidden_size
        out["stage_names"] = self.stage_names
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HieraConfig":
        """Build from a transformers ``config.json`` dict (``model_type="hiera"``; keys this class does not model are
        kept in ``extra``) or from timm's (``architecture`` names a Hiera preset:
        :func:`hiera_fast.checkpoints.hiera.config_from_timm`)."""
        data = dict(data)
        if "model_type" not in data and "architecture" in data:
            from .checkpoints.hiera import config_from_timm

            return config_from_timm(data)
        if data.get("model_type") != "hiera":
            raise ValueError(f"not a Hiera config: model_type is {data.get('model_type')!r}, expected 'hiera' (a "
                             "transformers config.json) or timm's 'architecture' key")
        known = {f.name for f in fields(cls)} - {"extra"}
        if "num_labels" not in data:  # transformers writes neither for its default of 2 labels
            data["num_labels"] = len(data["id2label"]) if "id2label" in data else 2
        for key in ("_out_features", "_out_indices"):
            if key in data:
                data.setdefault(key[1:], data.pop(key))
        kwargs = {k: v for k, v in data.items() if k in known}
        derived = {"model_type", "hidden_size", "stage_names"}
        extra = {k: v for k, v in data.items() if k not in known and k not in derived}
        config = cls(**kwargs, extra=extra)
        flags = config.masked_unit_attention
        if any(not before and now for before, now in zip(flags, flags[1:])):
            warnings.warn(f"hiera_fast: masked_unit_attention={list(flags)} turns mask-unit attention on after a "
                          "stage without it; a stage's first block then follows the previous stage's flag here, as "
                          "in the official model, while transformers' HieraModel gives it mask-unit attention if "
                          "either stage has it: a checkpoint trained with transformers computes differently here",
                          stacklevel=2)
        return config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HieraConfig":
        """Read a transformers, timm or official hub-mixin ``config.json`` (a file, or a directory holding one):
        :func:`hiera_fast.checkpoints.hiera.config_from_json`."""
        from .checkpoints.hiera import config_from_json

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path!r}")
        with open(path) as f:
            return config_from_json(json.load(f))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "HieraConfig":
        """A model of the official zoo, e.g. ``hiera_base_224``, ``hiera_large_16x224``, ``mae_hiera_tiny_224``."""
        key = name.removeprefix("facebook/").replace("-", "_")
        if key not in PRESETS:
            raise ValueError(f"unknown Hiera preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


_SIZES = {  # name: (embed_dim, heads of stage 1, depths)
    "tiny": (96, 1, (1, 2, 7, 2)),
    "small": (96, 1, (1, 2, 11, 2)),
    "base": (96, 1, (2, 3, 16, 3)),
    "base_plus": (112, 2, (2, 3, 16, 3)),
    "large": (144, 2, (2, 6, 36, 4)),
    "huge": (256, 4, (2, 6, 36, 4)),
}
_VIDEO = dict(image_size=(16, 224, 224), patch_size=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3),
              query_stride=(1, 2, 2), masked_unit_size=(1, 8, 8), sep_pos_embed=True, num_labels=400)
_MAE = dict(num_query_pool=2, decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16)


def _presets() -> dict[str, dict]:
    presets = {}
    for size, (dim, heads, depths) in _SIZES.items():
        base = dict(embed_dim=dim, depths=depths, num_heads=tuple(heads * 2**i for i in range(4)))
        presets[f"hiera_{size}_224"] = base
        presets[f"mae_hiera_{size}_224"] = {**base, **_MAE}
        if size not in ("tiny", "small"):
            presets[f"hiera_{size}_16x224"] = {**base, **_VIDEO}
            presets[f"mae_hiera_{size}_16x224"] = {**base, **_VIDEO, **_MAE}
    return presets


PRESETS: dict[str, dict] = _presets()
