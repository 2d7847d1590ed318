"""Put a checkpoint's parameters on devices as the model's params pytree (see model.py).

`load_params(ckpt, mesh)` reads each tensor through the checkpoint interface (checkpoint.py),
stacks the per-layer tensors in numeric layer order and places them with the table's shardings.
This simple version reads whole tensors on the host; a per-device reader (make_array_from_callback
over `ckpt.read_part` slabs) can replace `_place` without changing the signature.
"""

from __future__ import annotations

import logging
from typing import Optional

import ml_dtypes
import numpy as np

from .config import ModelConfig
from .errors import StructureError
from .params import LAYER_PARAM_NAMES, ParamSpec, layer_entries, param_table
from .progress import ProgressFn, null_progress
from .quant import QuantizedArray

log = logging.getLogger(__name__)
BF16 = np.dtype(ml_dtypes.bfloat16)
# Stored float32 and kept float32 by the model (embeddings, norm scales, router); other float
# (matmul) weights -> bf16, which is what the reference computes with.
KEEP_F32 = {"embeddings", "final_norm", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w"}


class ArrayCheckpoint:
    """The read interface of checkpoint.py over in-memory arrays keyed by parameter path (e.g.
    float_weights.npz: float matmul weights, which the model uses as bf16 with unit scales)."""

    kind = "arrays"

    def __init__(self, cfg: ModelConfig, arrays):
        self.config = cfg
        self.table = param_table(cfg)
        self.arrays = arrays
        self.bytes_read = 0

    def read(self, entry: ParamSpec, index=None):
        if entry.path not in self.arrays:
            raise StructureError(f"arrays: missing {entry.path}")
        value = self.arrays[entry.path]
        if not isinstance(value, QuantizedArray):
            value = np.asarray(value)
            if tuple(value.shape) != tuple(entry.shape):
                raise StructureError(f"arrays: {entry.path} has shape {list(value.shape)}, expected {list(entry.shape)}")
        return value


def host_params(ckpt, progress: ProgressFn = null_progress) -> dict:
    """The params pytree as numpy arrays (int8 weights stay int8 + scales)."""
    from .model import QWeight

    cfg = ckpt.config
    table = ckpt.table
    total = len(table)
    done = 0

    def read(entry):
        nonlocal done
        value = ckpt.read(entry)
        done += 1
        progress(done, total, entry.path)
        if isinstance(value, QuantizedArray):
            return value
        value = np.asarray(value)
        if tuple(value.shape) != tuple(entry.shape):
            raise StructureError(f"{entry.path}: shape {list(value.shape)} does not match the config ({list(entry.shape)})")
        return value if entry.name in KEEP_F32 else value.astype(BF16)

    by_name = {e.name: e for e in table if e.layer is None}
    params = {
        "embeddings": read(by_name["embeddings"]),
        "final_norm": read(by_name["final_norm"]).astype(np.float32),
        "layers": {},
    }
    for name in LAYER_PARAM_NAMES:
        entries = layer_entries(table, name)  # numeric layer order 0..L-1
        values = [read(e) for e in entries]
        if isinstance(values[0], QuantizedArray):
            if any(not isinstance(v, QuantizedArray) for v in values):
                raise StructureError(f"{name}: some layers are quantized and some are not")
            blocks = {v.blocks for v in values}
            if len(blocks) > 1:
                raise StructureError(f"{name}: layers use different scale row blocks {sorted(blocks)}")
            params["layers"][name] = QWeight(
                np.stack([v.values for v in values]), np.stack([v.scales for v in values])
            )
        elif any(isinstance(v, QuantizedArray) for v in values):
            raise StructureError(f"{name}: some layers are quantized and some are not")
        else:
            dtype = np.float32 if name in KEEP_F32 else BF16
            params["layers"][name] = np.stack([np.asarray(v, dtype) for v in values])
    assert len(params["layers"]) == len(LAYER_PARAM_NAMES) and cfg.num_layers == len(values)
    return params


def quantized_names(params: dict) -> dict:
    from .model import QWeight

    return {name: isinstance(w, QWeight) for name, w in params["layers"].items()}


def load_params(ckpt, mesh=None, *, progress: ProgressFn = null_progress) -> dict:
    """Read `ckpt` (anything with the open_checkpoint interface) into a device params pytree,
    sharded over `mesh` by the parameter table (one default device when mesh is None)."""
    params = host_params(ckpt, progress)
    return _place(params, ckpt.config, mesh)


def _place(params: dict, cfg: ModelConfig, mesh: Optional[object]):
    import jax

    if mesh is None:
        return jax.device_put(params)
    from .mesh import check_mesh, param_specs, shardings

    check_mesh(cfg, mesh)
    return jax.device_put(params, shardings(mesh, param_specs(cfg, quantized_names(params))))
