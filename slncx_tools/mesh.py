"""Device meshes: parse "MxD" / "model=M,data=D", build a ("data", "model") Mesh, and give the
PartitionSpec of every parameter (from the parameter table) and of the activations/KV cache.

Quantized weights: the int8 values use the table's spec; here their scales [..., R, out] use the
same spec with the row (R) dimension replicated. Scales are small, and keeping them whole along the
rows makes every R (1, 8, ...) correct on every model-axis size (1, 2, 4, 8, 16, ...). The
per-device loader (load.load_sharded) instead splits scales with their rows, re-gridding R exactly
as `reshard` does; the model's dequantization is correct for both layouts. Per-row int8
embeddings (a model.QEmbedding): values [V, D] as the table, (None, ("data", "model")); their scales
[V, 1] replicated (the size-1 dimension is never split).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from .config import ModelConfig
from .errors import MeshError
from .params import DATA, MODEL, LAYER_PARAM_NAMES, ParamSpec, mesh_axes_of, param_table

AXES = (DATA, MODEL)


def parse_mesh(spec) -> tuple:
    """A mesh string -> (data, model). "8x1" = model 8, data 1; "model=8,data=2"; "8" = model 8."""
    if isinstance(spec, (tuple, list)):
        data, model = spec
        return _checked(int(data), int(model), spec)
    s = str(spec).strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+)x(\d+)", s):
        return _checked(int(m.group(2)), int(m.group(1)), spec)
    if m := re.fullmatch(r"\d+", s):
        return _checked(1, int(s), spec)
    sizes = {DATA: 1, MODEL: 1}
    for part in filter(None, s.split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit():
            raise MeshError(f"mesh {spec!r}: expected 'MxD' (model x data, e.g. 8x1) or 'model=M,data=D'")
        sizes[name] = int(value)
    return _checked(sizes[DATA], sizes[MODEL], spec)


def _checked(data: int, model: int, spec) -> tuple:
    if data < 1 or model < 1:
        raise MeshError(f"mesh {spec!r}: axis sizes must be at least 1")
    return data, model


def make_mesh(spec="1x1", devices: Optional[Sequence] = None):
    """A jax Mesh with axes ("data", "model") over the first data·model devices."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    data, model = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need > len(devices):
        raise MeshError(
            f"mesh {spec!r} (model {model} x data {data}) needs {need} devices, but only {len(devices)} "
            f"{devices[0].platform if devices else ''} device(s) are available; use a smaller --mesh"
        )
    return Mesh(np.array(devices[:need]).reshape(data, model), AXES)


def mesh_sizes(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def partition_spec(entry: ParamSpec, part: str = "array", stacked: bool = False):
    """The PartitionSpec of `part` ("array" | "weight" | "scales") of an entry; with `stacked`,
    a leading replicated layer axis is added (the model's stacked per-layer weights)."""
    from jax.sharding import PartitionSpec as P

    spec = list(entry.partition)
    if part == "scales":
        spec[entry.row_axis] = None  # scales are replicated along their R row blocks
    if stacked:
        spec = [None] + spec
    return P(*spec)


def embedding_scales_spec(entry: ParamSpec):
    """Per-row embedding scales [V, 1]: split like the table's rows (replicated in the table), never
    along the size-1 dimension that stands for the table's sharded D."""
    from jax.sharding import PartitionSpec as P

    return P(entry.partition[0], None)


def check_mesh(cfg: ModelConfig, mesh_or_sizes) -> None:
    """MeshError unless every sharded dimension is divisible by the mesh axes that shard it."""
    sizes = mesh_or_sizes if isinstance(mesh_or_sizes, dict) else mesh_sizes(mesh_or_sizes)
    seen = set()
    for entry in param_table(cfg):
        if entry.name in seen:
            continue
        seen.add(entry.name)
        for dim, (n, axis) in enumerate(zip(entry.shape, entry.partition)):
            axes = mesh_axes_of(axis)
            k = 1
            for a in axes:
                k *= sizes.get(a, 1)
            if n % k:
                where = entry.path if entry.layer is None else f"{entry.name} (every layer)"
                raise MeshError(
                    f"mesh data={sizes.get(DATA, 1)} model={sizes.get(MODEL, 1)} does not fit {where}: "
                    f"dimension {dim} of shape {list(entry.shape)} has size {n}, not divisible by "
                    f"{'x'.join(axes)} = {k}"
                )


def param_specs(cfg: ModelConfig, quantized: dict) -> dict:
    """PartitionSpecs shaped like the model's params pytree. `quantized` maps a per-layer name to
    whether that weight is a model.QWeight, and "embeddings" to whether the table is a
    model.QEmbedding (per-row int8)."""
    from .model import QWeight

    table = param_table(cfg)
    first = {e.name: e for e in reversed(table)}
    layers = {}
    for name in LAYER_PARAM_NAMES:
        e = first[name]
        if quantized.get(name):
            layers[name] = QWeight(partition_spec(e, "weight", True), partition_spec(e, "scales", True))
        else:
            layers[name] = partition_spec(e, "array", True)
    emb = partition_spec(first["embeddings"])
    if quantized.get("embeddings"):  # per-row int8: values split like the table, [V, 1] scales replicated
        from .model import QEmbedding

        emb = QEmbedding(emb, embedding_scales_spec(first["embeddings"]))
    return {
        "embeddings": emb,
        "final_norm": partition_spec(first["final_norm"]),
        "layers": layers,
    }


def shardings(mesh, specs):
    """NamedShardings for a pytree of PartitionSpecs."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_axis(mesh, batch: int):
    """"data" when it divides the batch, else None (replicate activations over data)."""
    return DATA if batch % mesh_sizes(mesh).get(DATA, 1) == 0 else None


def cache_specs(mesh, cfg: ModelConfig, batch: int):
    """PartitionSpecs for a model.KVCache: batch over data, kv heads over model when they divide."""
    from jax.sharding import PartitionSpec as P

    from .model import KVCache

    b = batch_axis(mesh, batch)
    heads = MODEL if cfg.num_kv_heads % mesh_sizes(mesh).get(MODEL, 1) == 0 else None
    kv = P(None, b, None, heads, None)
    return KVCache(k=kv, v=kv, valid=P(b, None), count=P(b), length=P())
