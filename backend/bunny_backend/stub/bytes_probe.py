"""Whether this Triton's python stub reads BYTES tensors correctly with the numpy it runs.

Triton 2.51's stub (pybind11 2.10) builds the numpy view of a tensor's memory through numpy 1's C ABI: under
numpy 2 a BYTES input comes out garbled and the stub dies on the first request (fixed in Triton 24.11 by
python_backend #384). So the behaviour is checked, not the version: at load, a known BYTES tensor's serialized
form goes through the same path (a tensor over raw memory, read back by the stub's C++ as a uint8 array, then
deserialized as Triton does for an input), and the model refuses to load only if it comes back wrong.
"""
from __future__ import annotations

import numpy as np
import torch

PROBE = np.array(["bunny 兔子".encode(), b"", bytes(range(256))], dtype=np.object_)


class BytesUnreadable(RuntimeError):
    pass


def check_bytes_round_trip(pb_utils) -> None:
    try:
        wire = torch.frombuffer(bytearray(pb_utils.serialize_byte_tensor(PROBE)), dtype=torch.uint8)
        # a torch tensor, not a numpy one: the stub renames the DLPack capsule it takes to "used_dlpack", which
        # numpy's capsule destructor reports as an error, in a loop that never ends (Triton 2.51); torch's ignores
        view = pb_utils.Tensor.from_dlpack("bunny_bytes_probe", wire).as_numpy()
        back = list(pb_utils.deserialize_bytes_tensor(view))
        detail = "" if back == list(PROBE) else f"{len(PROBE)} strings went in, {back[:3]!r} came back"
    except Exception as e:   # noqa: BLE001 - a garbled length reads past the buffer, among others
        detail = f"{type(e).__name__}: {e}"
    if detail:
        raise BytesUnreadable(
            f"this Triton's python backend cannot read BYTES tensors with numpy {np.__version__} ({detail}); "
            "Triton 2.51's stub needs numpy < 2 (fixed in Triton 24.11): install numpy 1.26.4 into the Python "
            "that runs the stub, or use a newer Triton")
