"""The parameter table (SPEC §2): the single source of truth for every tensor of the model.

The reader, the writers, the store manifest, the shardings and the model all take shapes,
file order, storage and partitioning from here; nothing else derives them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

from .config import ModelConfig

# One entry of a PartitionSpec: None (replicated), one mesh axis, or a tuple of mesh axes.
AxisSpec = Union[None, str, tuple]

DATA, MODEL = "data", "model"

EMBED_PATH = "params/language_model/in_out_embed/embeddings"
FINAL_NORM_PATH = "params/language_model/rms_norm/scale"
LAYER_PREFIX = "params/transformer/decoder_layer_"

# Per-layer parameters in the order k = 0..11 of SPEC §2 (dict keys sorted as strings).
# name -> (logical shape as a function of cfg, partition spec, kind)
#   kind: "column" (quantized, R = 1 in the release), "row" (quantized, R = release_row_blocks),
#         "float" (stored float32)
LAYER_PARAMS = (
    ("moe/linear/w", lambda c: (c.num_experts, c.emb_size, c.ffn_size), (None, DATA, MODEL), "column"),
    ("moe/linear_1/w", lambda c: (c.num_experts, c.ffn_size, c.emb_size), (None, MODEL, DATA), "row"),
    ("moe/linear_v/w", lambda c: (c.num_experts, c.emb_size, c.ffn_size), (None, DATA, MODEL), "column"),
    ("multi_head_attention/key/w", lambda c: (c.emb_size, c.num_kv_heads * c.key_size), (DATA, MODEL), "column"),
    ("multi_head_attention/linear/w", lambda c: (c.num_q_heads * c.key_size, c.emb_size), (MODEL, DATA), "row"),
    ("multi_head_attention/query/w", lambda c: (c.emb_size, c.num_q_heads * c.key_size), (DATA, MODEL), "column"),
    ("multi_head_attention/value/w", lambda c: (c.emb_size, c.num_kv_heads * c.key_size), (DATA, MODEL), "column"),
    ("rms_norm/scale", lambda c: (c.emb_size,), (None,), "float"),
    ("rms_norm_1/scale", lambda c: (c.emb_size,), (None,), "float"),
    ("rms_norm_2/scale", lambda c: (c.emb_size,), (None,), "float"),
    ("rms_norm_3/scale", lambda c: (c.emb_size,), (None,), "float"),
    ("router/w", lambda c: (c.emb_size, c.num_experts), (DATA,), "float"),
)
LAYER_PARAM_NAMES = tuple(p[0] for p in LAYER_PARAMS)


@dataclass(frozen=True)
class ParamSpec:
    """One tensor of the checkpoint.

    `shape` is the logical shape. A quantized weight is stored as int8 values of that shape plus
    scales of shape [..., R, out] (`scales_shape(R)`); `release_blocks` is the R the released
    ckpt-0 uses (1 or 8), 0 for a float tensor.
    """

    index: int
    path: str
    name: str  # "embeddings", "final_norm", or the per-layer name, e.g. "moe/linear/w"
    layer: Optional[int]
    shape: tuple
    partition: tuple  # one AxisSpec per dimension
    release_blocks: int

    @property
    def quantized(self) -> bool:
        return self.release_blocks > 0

    @property
    def file(self) -> str:
        return f"tensor{self.index:05d}_000"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_axis(self) -> int:
        """The input (contracted) dimension of a matmul weight [..., in, out]."""
        return len(self.shape) - 2

    def scales_shape(self, blocks: int) -> tuple:
        assert self.quantized
        return self.shape[:-2] + (blocks, self.shape[-1])

    @property
    def release_dtype(self) -> str:
        return "int8" if self.quantized else "float32"

    def release_nbytes(self) -> int:
        """Bytes of raw array data in the released layout (int8 values + bf16 scales, or float32)."""
        if not self.quantized:
            return 4 * self.numel
        s = 1
        for d in self.scales_shape(self.release_blocks):
            s *= d
        return self.numel + 2 * s


@lru_cache(maxsize=None)
def param_table(cfg: ModelConfig) -> tuple:
    """All parameters of `cfg` in file order (SPEC §2: layers in string-sorted order)."""
    entries = [
        ParamSpec(0, EMBED_PATH, "embeddings", None, (cfg.vocab_size, cfg.emb_size), (None, (DATA, MODEL)), 0),
        ParamSpec(1, FINAL_NORM_PATH, "final_norm", None, (cfg.emb_size,), (None,), 0),
    ]
    for position, layer in enumerate(sorted(range(cfg.num_layers), key=str)):
        for k, (name, shape_fn, partition, kind) in enumerate(LAYER_PARAMS):
            blocks = {"float": 0, "column": 1, "row": cfg.release_row_blocks}[kind]
            entries.append(
                ParamSpec(
                    index=2 + 12 * position + k,
                    path=f"{LAYER_PREFIX}{layer}/{name}",
                    name=name,
                    layer=layer,
                    shape=tuple(shape_fn(cfg)),
                    partition=tuple(partition),
                    release_blocks=blocks,
                )
            )
    return tuple(entries)


def num_files(cfg: ModelConfig) -> int:
    return 2 + 12 * cfg.num_layers


def total_params(cfg: ModelConfig) -> int:
    return sum(p.numel for p in param_table(cfg))


def by_path(cfg: ModelConfig) -> dict:
    return {p.path: p for p in param_table(cfg)}


def layer_entries(table: Sequence[ParamSpec], name: str) -> list:
    """The entries of one per-layer parameter, ordered by layer number (not file order)."""
    return sorted((p for p in table if p.name == name), key=lambda p: p.layer)


def mesh_axes_of(spec: AxisSpec) -> tuple:
    """The mesh axis names one PartitionSpec entry shards over."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (spec,)
    return tuple(spec)
