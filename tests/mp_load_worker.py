"""One process of the multi-process loading test (tests/test_multiprocess.py); not a test itself.

    python tests/mp_load_worker.py STORE MESH PORT NUM_PROCESSES PROCESS_ID LOCAL_DEVICES TOKENS_NPZ

Joins a jax.distributed job on 127.0.0.1:PORT with LOCAL_DEVICES fake CPU devices, loads STORE onto
the global MESH with load_params, runs one jitted forward on the global params, and prints one JSON
line: bytes read, the mesh's device order, per leaf the addressable shards (index and sha256 of
their bytes) and the (replicated) logits.
"""

import os
import sys

store, mesh_spec, port, nproc, pid, local, tokens_npz = sys.argv[1:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(local)}"
os.environ["JAX_PLATFORMS"] = "cpu"

import hashlib  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default; cross-process CPU collectives
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{int(port)}", num_processes=int(nproc), process_id=int(pid),
    initialization_timeout=60, shutdown_timeout_seconds=30,
)
try:
    from jax.sharding import NamedSharding, PartitionSpec

    from slncx_tools.checkpoint import open_checkpoint
    from slncx_tools.config import TINY
    from slncx_tools.load import load_params
    from slncx_tools.mesh import make_mesh
    from slncx_tools.model import forward

    mesh = make_mesh(mesh_spec)
    ckpt = open_checkpoint(store)
    params = load_params(ckpt, mesh)
    out = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "bytes_read": ckpt.bytes_read,
        "mesh_devices": [[d.id, d.process_index] for d in mesh.devices.flat],
        "local_devices": [d.id for d in jax.local_devices()],
        "leaves": {},
    }
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        shards = []
        for s in a.addressable_shards:
            data = np.ascontiguousarray(np.asarray(s.data))
            shards.append({
                "device": s.device.id,
                "index": [list(sl.indices(n)[:2]) for sl, n in zip(s.index, a.shape)],
                "dtype": str(data.dtype), "shape": list(data.shape),
                "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            })
        out["leaves"][jax.tree_util.keystr(path)] = {"shape": list(a.shape), "shards": shards}

    # one forward over the global params (cross-process collectives); tokens and logits replicated
    tokens = np.load(tokens_npz)["tokens"]
    replicated = NamedSharding(mesh, PartitionSpec())
    gtokens = jax.make_array_from_callback(tokens.shape, replicated, lambda idx: tokens[idx])
    fwd = jax.jit(lambda p, t: forward(p, t, TINY)[0], out_shardings=replicated)
    logits = fwd(params, gtokens)
    out["logits"] = np.asarray(logits.addressable_shards[0].data, np.float32).tolist()
    print(json.dumps(out), flush=True)
finally:
    jax.distributed.shutdown()
