"""HieraDetConfig: SAM 2's Hiera image encoder ("hieradet") with the official ``sam2`` constructor's field names, its
per-block schedule, the input sizes the official code accepts, and the SAM 2 / SAM 2.1 presets."""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"HieraDetConfig.{name} must be an int, got {value!r}")
    return int(value)


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (numbers.Number, str)) or not isinstance(value, Iterable):
        raise ValueError(f"HieraDetConfig.{name} must be a sequence of ints, got {value!r}")
    return tuple(_int(v, f"{name}[{i}]") for i, v in enumerate(value))


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = (_int(value, name),) * 2 if isinstance(value, numbers.Number) else _ints(value, name)
    if len(pair) != 2:
        raise ValueError(f"HieraDetConfig.{name} must be an int or a pair (height, width), got {value!r}")
    return pair


@dataclass(frozen=True)
class BlockSpec:
    """One block of the trunk as the official ``Hiera.__init__`` builds it: widths, heads, its window (0: global
    attention) and its query-pool stride (None: no pooling)."""

    index: int
    stage: int
    dim: int
    dim_out: int
    num_heads: int
    window_size: int
    q_stride: int | None
    drop_path: float


@dataclass
class HieraDetConfig:
    """Hyper-parameters of SAM 2's Hiera trunk, named as the official ``sam2.modeling.backbones.hieradet.Hiera``
    arguments (``patch_*``, ``num_channels``, ``layer_norm_eps`` are fixed there and named as in transformers).

    Stage ``s`` has ``stages[s]`` blocks of width ``embed_dim * dim_mul**s`` (rounded at every stage, as the official
    loop does) and ``num_heads * head_mul**s`` heads. A block attends inside ``window_spec[s]``-sized windows, or over
    the whole map if its global index is in ``global_att_blocks``; a stage's first block keeps the *previous* stage's
    window (the lag). The first blocks of stages 2..``q_pool + 1`` max-pool their queries (and their residual) by
    ``q_stride``. ``return_interm_layers`` returns every stage's output, else only the last. An impossible
    configuration raises ``ValueError`` naming the field; :meth:`check_image_size` tells which inputs run.
    """

    embed_dim: int = 96
    num_heads: int = 1
    stages: Sequence[int] = (2, 3, 16, 3)
    q_pool: int = 3
    q_stride: Sequence[int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14)
    window_spec: Sequence[int] = (8, 4, 14, 7)
    global_att_blocks: Sequence[int] = (12, 16, 20)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    return_interm_layers: bool = True
    num_channels: int = 3
    patch_kernel_size: Sequence[int] = (7, 7)
    patch_stride: Sequence[int] = (4, 4)
    patch_padding: Sequence[int] = (3, 3)
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads", "q_pool", "num_channels"):
            setattr(self, name, _int(getattr(self, name), name))
        for name in ("stages", "window_spec", "global_att_blocks"):
            setattr(self, name, _ints(getattr(self, name), name))
        for name in ("q_stride", "window_pos_embed_bkg_spatial_size", "patch_kernel_size", "patch_stride",
                     "patch_padding"):
            setattr(self, name, _pair(getattr(self, name), name))
        if not isinstance(self.return_interm_layers, bool):
            raise ValueError(f"HieraDetConfig.return_interm_layers must be a bool, got {self.return_interm_layers!r}")
        self._validate()

    def _validate(self) -> None:
        if not self.stages or min(self.stages) < 1:
            raise ValueError(f"HieraDetConfig.stages must be positive block counts, got {self.stages}")
        if len(self.window_spec) != len(self.stages):
            raise ValueError(f"HieraDetConfig.window_spec needs one window per stage ({len(self.stages)}), "
                             f"got {self.window_spec}")
        if self.window_spec[0] < 1 or min(self.window_spec) < 0:
            raise ValueError(f"HieraDetConfig.window_spec must be >= 0 (0: global) with window_spec[0] >= 1 (the "
                             f"size of pos_embed_window), got {self.window_spec}")
        if not 0 <= self.q_pool <= len(self.stages) - 1:
            raise ValueError(f"HieraDetConfig.q_pool must be in [0, {len(self.stages) - 1}], got {self.q_pool}")
        if self.q_stride[0] != self.q_stride[1] or self.q_stride[0] < 1:
            raise ValueError(f"HieraDetConfig.q_stride must be square and positive (the official block divides both "
                             f"window sides by q_stride[0]), got {self.q_stride}")
        bad = [b for b in self.global_att_blocks if not 0 <= b < self.depth]
        if bad:
            raise ValueError(f"HieraDetConfig.global_att_blocks {bad} are not block indices in [0, {self.depth})")
        for name in ("embed_dim", "num_heads", "num_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"HieraDetConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"HieraDetConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"HieraDetConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"HieraDetConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if min(self.window_pos_embed_bkg_spatial_size) < 1:
            raise ValueError("HieraDetConfig.window_pos_embed_bkg_spatial_size must be positive, got "
                             f"{self.window_pos_embed_bkg_spatial_size}")
        if min(self.patch_kernel_size + self.patch_stride) < 1 or min(self.patch_padding) < 0:
            raise ValueError("HieraDetConfig.patch_kernel_size/patch_stride must be positive and patch_padding >= 0")
        dims, heads = self.stage_dims, self.stage_heads
        for s, (dim, h) in enumerate(zip(dims, heads)):
            if h < 1 or dim % h:
                raise ValueError(f"HieraDetConfig: stage {s + 1} has {h} heads (num_heads, head_mul), which must "
                                 f"divide its width {dim} (embed_dim, dim_mul)")
        for spec in self.block_specs():
            if spec.q_stride is None:
                continue
            if spec.dim == spec.dim_out:
                raise ValueError(f"HieraDetConfig.dim_mul={self.dim_mul} keeps the width at pooling block "
                                 f"{spec.index}: the official block then pools its queries but not its residual")
            if spec.window_size == 0:
                raise ValueError(f"HieraDetConfig.global_att_blocks: pooling block {spec.index} (the first of stage "
                                 f"{spec.stage + 1}) cannot attend globally: the official block then divides by its "
                                 "window size 0 (ZeroDivisionError)")
            if spec.window_size < spec.q_stride:
                raise ValueError(f"HieraDetConfig.window_spec: pooling block {spec.index} attends in windows of "
                                 f"{spec.window_size}, smaller than q_stride {spec.q_stride}")

    # ------------------------------------------------------------------ the official schedule
    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> list[int]:
        """The index of each stage's last block (the official ``Hiera.stage_ends``)."""
        return [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]

    @property
    def q_pool_blocks(self) -> list[int]:
        """The blocks that pool: the first block of stages 2..q_pool + 1."""
        return [end + 1 for end in self.stage_ends[:-1]][: self.q_pool]

    @property
    def stage_dims(self) -> list[int]:
        dims = [self.embed_dim]
        for _ in self.stages[1:]:
            dims.append(int(dims[-1] * self.dim_mul))  # rounded per stage, as the official loop
        return dims

    @property
    def stage_heads(self) -> list[int]:
        heads = [self.num_heads]
        for _ in self.stages[1:]:
            heads.append(int(heads[-1] * self.head_mul))
        return heads

    @property
    def channel_list(self) -> list[int]:
        """The official ``Hiera.channel_list``: the returned maps' widths, coarsest first (what SAM 2's neck reads)."""
        return self.stage_dims[::-1] if self.return_interm_layers else self.stage_dims[-1:]

    def _schedule(self) -> list[tuple[int, int, bool, int, int | None]]:
        """``(index, stage, first, window, q_stride)`` per block, as the official ``Hiera.__init__`` loop assigns them:
        the window is taken before the stage advances (the lag); 0 marks a global block."""
        out, stage, ends, pools = [], 0, self.stage_ends, self.q_pool_blocks
        for i in range(self.depth):
            window = 0 if i in self.global_att_blocks else self.window_spec[stage]  # before the stage advances
            first = i - 1 in ends
            if first:
                stage += 1
            out.append((i, stage, first, window, self.q_stride[0] if i in pools else None))
        return out

    def block_specs(self) -> list[BlockSpec]:
        """Every block as the official ``Hiera.__init__`` loop makes it (window lag included)."""
        dpr = torch.linspace(0, self.drop_path_rate, self.depth, device="cpu").tolist()  # the official float32 rule
        dims, heads = self.stage_dims, self.stage_heads
        return [BlockSpec(index=i, stage=stage, dim=dims[stage - 1] if first else dims[stage], dim_out=dims[stage],
                          num_heads=heads[stage], window_size=window, q_stride=q_stride, drop_path=dpr[i])
                for i, stage, first, window, q_stride in self._schedule()]

    # ------------------------------------------------------------------ input sizes
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch embedding's output grid for a ``height`` x ``width`` image (a strided conv)."""
        return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in
                     zip((height, width), self.patch_kernel_size, self.patch_stride, self.patch_padding))

    def check_image_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of a ``height`` x ``width`` input, or ``ValueError`` if the official code cannot run it.

        It runs iff (1) the patch grid is a multiple of ``window_spec[0]`` in both dims: ``pos_embed_window`` is tiled
        ``grid // window_spec[0]`` times and added to the grid (1008 → 252 tokens: 248 tiled, a shape error); and
        (2) every pooling block with windows of ``ws`` keeps its window count in both dims,
        ``ceil(n / ws) == ceil((n // q) / (ws // q))``: ``window_unpartition`` re-reads the pooled windows on a grid
        padded from the pooled residual's size, and a count that changes fails or puts windows in the wrong place
        (and the map must hold at least ``q`` tokens to be pooled). Default window specs meet (2) whenever (1) holds.
        """
        problem = self._size_problem(height, width)
        if problem:
            hint = self._nearest_sizes(height, width)
            raise ValueError(f"HieraDet cannot run a {height}x{width} input: {problem}"
                             + (f"; try {hint}" if hint else ""))
        return self.token_grid(height, width)

    def _size_problem(self, height: int, width: int) -> str | None:
        grid = self.token_grid(height, width)
        ws0 = self.window_spec[0]
        if min(grid) < 1 or grid[0] % ws0 or grid[1] % ws0:
            return (f"its {grid[0]}x{grid[1]} patch grid is not a multiple of window_spec[0]={ws0} in both dims (the "
                    f"official model tiles the {ws0}x{ws0} pos_embed_window over the grid and fails on the remainder)")
        for index, _, _, ws, q in self._schedule():  # pure Python: the check runs in every forward
            if q is None:
                continue
            if min(grid) < q:
                return f"pooling block {index} would max-pool a {grid[0]}x{grid[1]} map, smaller than its stride {q}"
            pooled = (grid[0] // q, grid[1] // q)
            if ws:
                for n, m, side in zip(grid, pooled, ("height", "width")):
                    before, after = -(-n // ws), -(-m // (ws // q))
                    if before != after:
                        return (f"pooling block {index} cuts its {side} of {n} tokens into {before} windows of "
                                f"{ws}, but its pooled {side} of {m} into {after} windows of {ws // q} (the official "
                                "window_unpartition would fail or misplace windows)")
            grid = pooled
        return None

    def _nearest_sizes(self, height: int, width: int) -> str:
        """Nearby square sizes that run, for the error message."""
        step = self.patch_stride[0] * self.window_spec[0]
        n = max(height, width)
        below = [k * step for k in range(n // step, 0, -1) if self._size_problem(k * step, k * step) is None][:1]
        above = [k * step for k in range(n // step + 1, n // step + 64) if self._size_problem(k * step, k * step)
                 is None][:1]
        return " or ".join(f"{s}x{s}" for s in below + above)

    # ------------------------------------------------------------------ presets and other formats
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HieraDetConfig:
        """A SAM 2 trunk by name: ``sam2.1_hiera_tiny`` (or ``_small``, ``_base_plus``, ``_large``), the SAM 2.0
        names ``sam2_hiera_*`` (the same trunks), the yaml / ultralytics / hub spellings (``sam2.1_hiera_t``,
        ``sam2.1_b``, ``facebook/sam2.1-hiera-base-plus``) and timm's (``sam2_hiera_tiny.fb_r896``)."""
        key = preset_key(name)
        if key is None:
            raise ValueError(f"unknown SAM 2 preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_transformers_dict(cls, data: dict) -> HieraDetConfig:
        """From a transformers ``Sam2HieraDetConfig`` dict, or a ``Sam2VisionConfig`` / ``Sam2Config`` one holding it
        (``backbone_config``, ``vision_config``). Missing fields take transformers' defaults (SAM 2.1-tiny's)."""
        data = dict(data)
        if "vision_config" in data:
            data = dict(data["vision_config"] or {})
        if "backbone_config" in data:
            data = dict(data["backbone_config"] or {})
        if data.get("model_type", "sam2_hiera_det_model") != "sam2_hiera_det_model":
            raise ValueError(f"not a SAM 2 Hiera config: model_type is {data.get('model_type')!r}, expected "
                             "'sam2_hiera_det_model' (or a sam2 / sam2_vision_model config holding one)")
        data = {**_TRANSFORMERS_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
        if data["hidden_act"] != "gelu":
            raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (the SAM 2 trunk uses exact GELU)")
        kwargs = {ours: data[theirs] for ours, theirs in _TRANSFORMERS_NAMES.items()}
        dims, heads = list(data["embed_dim_per_stage"]), list(data["num_attention_heads_per_stage"])
        kwargs["dim_mul"] = dims[1] / dims[0] if len(dims) > 1 else 2.0
        kwargs["head_mul"] = heads[1] / heads[0] if len(heads) > 1 else 2.0
        config = cls(**kwargs)
        if config.stage_dims != dims or config.stage_heads != heads:
            raise ValueError(f"embed_dim_per_stage {dims} / num_attention_heads_per_stage {heads} are not a "
                             f"geometric series (the official model's dim_mul / head_mul): got "
                             f"{config.stage_dims} / {config.stage_heads}")
        return config

    def to_transformers_dict(self) -> dict:
        """A transformers ``Sam2HieraDetConfig`` dict (``config.json`` of ``Sam2HieraDetModel``)."""
        out = {theirs: list(v) if isinstance(v := getattr(self, ours), tuple) else v
               for ours, theirs in _TRANSFORMERS_NAMES.items()}
        out.update(model_type="sam2_hiera_det_model", embed_dim_per_stage=self.stage_dims,
                   num_attention_heads_per_stage=self.stage_heads, hidden_act="gelu")
        return out


# ours -> transformers' Sam2HieraDetConfig (drop_path_rate and return_interm_layers have no counterpart there)
_TRANSFORMERS_NAMES = {
    "embed_dim": "hidden_size", "num_heads": "num_attention_heads", "stages": "blocks_per_stage",
    "q_pool": "num_query_pool_stages", "q_stride": "query_stride",
    "window_pos_embed_bkg_spatial_size": "window_positional_embedding_background_size",
    "window_spec": "window_size_per_stage", "global_att_blocks": "global_attention_blocks",
    "mlp_ratio": "mlp_ratio", "num_channels": "num_channels", "patch_kernel_size": "patch_kernel_size",
    "patch_stride": "patch_stride", "patch_padding": "patch_padding", "layer_norm_eps": "layer_norm_eps",
}
_TRANSFORMERS_DEFAULTS = {  # transformers 5's Sam2HieraDetConfig defaults
    "hidden_size": 96, "num_attention_heads": 1, "num_channels": 3, "patch_kernel_size": [7, 7],
    "patch_stride": [4, 4], "patch_padding": [3, 3], "query_stride": [2, 2],
    "window_positional_embedding_background_size": [7, 7], "num_query_pool_stages": 3,
    "blocks_per_stage": [1, 2, 7, 2], "embed_dim_per_stage": [96, 192, 384, 768],
    "num_attention_heads_per_stage": [1, 2, 4, 8], "window_size_per_stage": [8, 4, 14, 7],
    "global_attention_blocks": [5, 7, 9], "mlp_ratio": 4.0, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
}

# the trunks of sam2/configs/sam2.1/*.yaml; sam2/configs/sam2/*.yaml are the same, key for key
_TRUNKS = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                 window_pos_embed_bkg_spatial_size=(7, 7)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                  window_pos_embed_bkg_spatial_size=(7, 7)),
    "base_plus": dict(embed_dim=112, num_heads=2),  # the constructor's defaults otherwise
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                  window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}
PRESETS: dict[str, dict] = {f"{version}_hiera_{size}": trunk for version in ("sam2.1", "sam2")
                            for size, trunk in _TRUNKS.items()}
_SHORT = {"t": "tiny", "s": "small", "b+": "base_plus", "b": "base_plus", "bplus": "base_plus", "l": "large"}


def preset_key(name: str) -> str | None:
    """The :data:`PRESETS` key a spelling of a SAM 2 model name refers to, or None."""
    if not isinstance(name, str):
        return None
    key = name.lower().removeprefix("facebook/").replace("-", "_").removesuffix(".pt").removesuffix(".yaml")
    key = re.sub(r"\.fb_\w+$", "", key)  # timm's pretrained tags
    m = re.fullmatch(r"(sam2(?:\.1)?)_(?:hiera_)?(tiny|small|base_plus|large|t|s|b\+|bplus|b|l)", key)
    if m is None:
        return None
    return f"{m.group(1)}_hiera_{_SHORT.get(m.group(2), m.group(2))}"
