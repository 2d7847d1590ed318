"""Model configuration: a frozen dataclass with presets (SPEC §1). Pure: no I/O, no jax."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """SPEC §1: int(wf·D)·2//3, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    emb_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    key_size: int
    widening_factor: float
    num_experts: int
    num_selected_experts: int
    sequence_len: int
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    attn_output_multiplier: float = 0.08838834764831845
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    logit_soft_cap: float = 30.0
    pad_token: int = 0
    eos_token: int = 2
    # Scale row blocks R the release uses for the two row-parallel weights (one per model shard).
    release_row_blocks: int = 8

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.key_size % 2:
            raise ConfigError(f"key_size {self.key_size} must be even for rotate-half RoPE")
        if not 0 < self.num_selected_experts <= self.num_experts:
            raise ConfigError(
                f"num_selected_experts {self.num_selected_experts} not in 1..{self.num_experts}"
            )

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)


SLNCX = ModelConfig(
    name="SLNCX",
    vocab_size=131072,
    emb_size=6144,
    num_layers=64,
    num_q_heads=48,
    num_kv_heads=8,
    key_size=128,
    widening_factor=8,
    num_experts=8,
    num_selected_experts=2,
    sequence_len=8192,
)

# The configuration of ../shared/fixtures (the original implementation on a tiny model).
TINY = ModelConfig(
    name="TINY",
    vocab_size=512,
    emb_size=32,
    num_layers=12,
    num_q_heads=16,
    num_kv_heads=8,
    key_size=8,
    widening_factor=2,
    num_experts=8,
    num_selected_experts=2,
    sequence_len=128,
    attn_output_multiplier=1 / math.sqrt(8),
)

# The embedded model shipped in checkpoints/slncx-tiny (trained by scripts/train_tiny.py): the
# SLNCX architecture (8 experts, top-2, grouped-query attention, RoPE, soft cap, multipliers) at a
# laptop's scale; R = 8 row blocks divide its row-parallel inputs (256 and 176).
SLNCX_TINY = ModelConfig(
    name="SLNCX-TINY",
    vocab_size=4096,
    emb_size=128,
    num_layers=4,
    num_q_heads=8,
    num_kv_heads=2,
    key_size=32,
    widening_factor=2,
    num_experts=8,
    num_selected_experts=2,
    sequence_len=1024,
    attn_output_multiplier=1 / math.sqrt(32),
)

PRESETS = {c.name: c for c in (SLNCX, TINY, SLNCX_TINY)}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise ConfigError(f"unknown config preset {name!r}; known: {', '.join(PRESETS)}") from None


def infer_config(
    *,
    vocab_size: int,
    emb_size: int,
    num_layers: int,
    q_width: int,
    kv_width: int,
    ffn: int,
    num_experts: int,
    key_size: int | None = None,
) -> ModelConfig:
    """Infer a config from checkpoint shapes: a matching preset if any, else a custom one.

    Shapes cannot tell the head size from the head count (the query weight is [D, H·key_size]),
    so a preset wins when the shapes match it; otherwise key_size defaults to 128 (the SLNCX value)
    when it divides both widths, else to the largest power of two that does.
    """
    for cfg in PRESETS.values():
        if (
            cfg.vocab_size, cfg.emb_size, cfg.num_layers, cfg.num_q_heads * cfg.key_size,
            cfg.num_kv_heads * cfg.key_size, cfg.ffn_size, cfg.num_experts,
        ) == (vocab_size, emb_size, num_layers, q_width, kv_width, ffn, num_experts) and (
            key_size in (None, cfg.key_size)
        ):
            return cfg
    if key_size is None:
        key_size = 128
        while key_size > 2 and (q_width % key_size or kv_width % key_size):
            key_size //= 2
    if q_width % key_size or kv_width % key_size:
        raise ConfigError(f"key_size {key_size} does not divide q width {q_width} / kv width {kv_width}")
    wf = _widening_factor_for(emb_size, ffn)
    return ModelConfig(
        name="custom",
        vocab_size=vocab_size,
        emb_size=emb_size,
        num_layers=num_layers,
        num_q_heads=q_width // key_size,
        num_kv_heads=kv_width // key_size,
        key_size=key_size,
        widening_factor=wf,
        num_experts=num_experts,
        num_selected_experts=min(2, num_experts),
        sequence_len=8192,
        attn_output_multiplier=1 / math.sqrt(key_size),
    )


def _widening_factor_for(emb_size: int, ffn: int) -> float:
    """A widening factor whose ffn_size(D, wf) is exactly `ffn`."""
    # ffn_size rounds int(wf·D)·2//3 up to a multiple of 8: try wf = w/D for w near 1.5·ffn.
    for width in range(max(1, (3 * ffn) // 2 - 16), (3 * ffn) // 2 + 16):
        wf = width / emb_size
        if ffn_size(emb_size, wf) == ffn:
            return wf
    raise ConfigError(f"no widening factor gives ffn size {ffn} for width {emb_size}")
