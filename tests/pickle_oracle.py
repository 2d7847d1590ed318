"""The original loader's way of reading a file — plain `pickle.load` with a stub
`QuantizedWeight8bit` in `__main__` — as an independent oracle for trusted files only.

It runs in a subprocess: unpickling a bf16 array mutates numpy's shared `ml_dtypes.bfloat16`
dtype (its flags go from 64 to 80, which changes its hash), after which a JAX imported earlier in
the same process rejects every bf16 array ("Dtype bfloat16 is not a valid JAX array type"). Our
reader never unpickles, so it does not have this problem; the tests must not inflict it either.
"""

import pickle
import subprocess
import sys

import numpy as np

_SCRIPT = r"""
import pickle, sys
import numpy as np

class QuantizedWeight8bit:
    def __setstate__(self, state):
        self.__dict__.update(state)

QuantizedWeight8bit.__module__ = "__main__"
sys.modules["__main__"].QuantizedWeight8bit = QuantizedWeight8bit
out = []
for path in sys.stdin.read().splitlines():
    with open(path, "rb") as f:
        obj = pickle.load(f)
    if isinstance(obj, np.ndarray):
        parts = {"array": obj}
        cls = "ndarray"
    else:
        parts = {"weight": obj.weight, "scales": obj.scales}
        cls = type(obj).__module__ + "." + type(obj).__name__
    out.append((cls, {k: (v.dtype.name, v.shape, np.ascontiguousarray(v).tobytes()) for k, v in parts.items()}))
sys.stdout.buffer.write(pickle.dumps(out))
"""


def original_load(paths) -> list:
    """For each path: (class name, {part: (dtype name, shape, raw C-order bytes)})."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input="\n".join(map(str, paths)).encode(),
                          capture_output=True, check=True)
    return pickle.loads(proc.stdout)  # our own subprocess's output: plain tuples, bytes and str


def bits(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()
