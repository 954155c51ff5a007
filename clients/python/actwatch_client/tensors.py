"""Activations to wire tensors: numpy arrays and torch tensors, sent in their own dtype.

The wire carries f32, f16 and bf16 as little-endian, row-major bytes (``actwatch.v1.Tensor``). An
array is sent as it is: float16 stays float16, bfloat16 stays bfloat16 (no up-cast, the server
converts once). float64 (numpy's default) has no wire type and is cast down to float32. torch is
never imported here: a tensor is recognised only if torch is already loaded.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from ._proto.actwatch.v1 import actwatch_pb2 as pb

__all__ = ["Batch", "to_tensor", "to_trace_batch", "split_batch"]


class Batch(NamedTuple):
    """Traces of one site: ``activations`` is [rows, d], one trace id (and position) per row."""

    site: str
    activations: Any
    trace_ids: Sequence[Any]
    positions: Optional[Sequence[int]] = None


_NUMPY_DTYPES = {
    np.dtype(np.float32): pb.DTYPE_F32,
    np.dtype(np.float16): pb.DTYPE_F16,
}


def _torch_tensor_type():
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _torch_to_numpy(t) -> tuple[np.ndarray, int]:
    torch = sys.modules["torch"]
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the 2-byte words, keep the bits.
        return t.view(torch.int16).numpy(), pb.DTYPE_BF16
    if t.dtype == torch.float16:
        return t.numpy(), pb.DTYPE_F16
    if t.dtype == torch.float32:
        return t.numpy(), pb.DTYPE_F32
    if t.dtype == torch.float64:
        return t.to(torch.float32).numpy(), pb.DTYPE_F32
    raise ValueError(f"activations must be a floating-point tensor, got torch dtype {t.dtype}")


def _numpy_to_wire(a: np.ndarray) -> tuple[np.ndarray, int]:
    if a.dtype.name == "bfloat16":  # ml_dtypes / jax bfloat16
        return a.view(np.uint16), pb.DTYPE_BF16
    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in ("=", "|") else a.dtype
    if dt in _NUMPY_DTYPES:
        return a, _NUMPY_DTYPES[dt]
    if dt == np.float64:
        return a.astype(np.float32), pb.DTYPE_F32
    raise ValueError(
        f"activations must be float32, float16 or bfloat16 (float64 is cast to float32), got {a.dtype}"
    )


def to_tensor(activations: Any) -> pb.Tensor:
    """Encodes a 2-D array-like ([rows, d]) as a wire tensor in its own dtype.

    Accepts numpy arrays (float32, float16, ml_dtypes bfloat16; float64 is cast to float32), torch
    tensors (float32, float16, bfloat16, on any device) and anything ``np.asarray`` takes (as float32
    unless it is already a float array).
    """
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(activations, torch_tensor):
        arr, dtype = _torch_to_numpy(activations)
    else:
        arr = np.asarray(activations)
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float32)
        arr, dtype = _numpy_to_wire(arr)
    if arr.ndim != 2:
        raise ValueError(f"activations must be 2-D [rows, d], got shape {tuple(arr.shape)}")
    # Little-endian, row-major. (On a little-endian host with a C-contiguous array this is no copy.)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    rows, cols = arr.shape
    return pb.Tensor(data=arr.tobytes(), shape=[rows, cols], dtype=dtype)


def _ids(trace_ids: Iterable[Any]) -> list[str]:
    if isinstance(trace_ids, (str, bytes)):
        raise ValueError("trace_ids must be a sequence with one id per row, not a single string")
    out = []
    for t in trace_ids:
        if isinstance(t, bytes):
            t = t.decode()
        elif isinstance(t, np.generic):
            t = t.item()
        out.append(t if isinstance(t, str) else str(t))
    return out


def _positions(positions: Any) -> list[int]:
    if positions is None:
        return []
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(positions, torch_tensor):
        positions = positions.detach().cpu().numpy()
    return [int(p) for p in np.asarray(positions).reshape(-1)]


def to_trace_batch(
    site: Any, activations: Any, trace_ids: Iterable[Any], positions: Any = None
) -> pb.TraceBatch:
    """Builds a ``TraceBatch``; checks locally that ids and positions match the rows."""
    tensor = to_tensor(activations)
    ids = _ids(trace_ids)
    pos = _positions(positions)
    rows = tensor.shape[0]
    if len(ids) != rows:
        raise ValueError(f"{len(ids)} trace ids for {rows} rows of activations (need one per row)")
    if pos and len(pos) != rows:
        raise ValueError(f"{len(pos)} positions for {rows} rows of activations (need none or one per row)")
    return pb.TraceBatch(site=str(site), activations=tensor, trace_ids=ids, positions=pos)


def split_batch(batch: pb.TraceBatch, max_bytes: int) -> list[pb.TraceBatch]:
    """Splits a batch by rows so that each part's tensor stays under ``max_bytes`` (0: no split)."""
    rows, cols = batch.activations.shape
    data = batch.activations.data
    if max_bytes <= 0 or len(data) <= max_bytes or rows <= 1:
        return [batch]
    row_bytes = len(data) // rows
    per = max(1, max_bytes // max(row_bytes, 1))
    parts = []
    for start in range(0, rows, per):
        end = min(rows, start + per)
        parts.append(
            pb.TraceBatch(
                site=batch.site,
                activations=pb.Tensor(
                    data=data[start * row_bytes : end * row_bytes],
                    shape=[end - start, cols],
                    dtype=batch.activations.dtype,
                ),
                trace_ids=batch.trace_ids[start:end],
                positions=batch.positions[start:end] if batch.positions else [],
            )
        )
    return parts


def as_batches(batches: Any) -> Iterable[Any]:
    """A single (site, activations, trace_ids[, positions]) tuple is one batch, not an iterable of them."""
    if isinstance(batches, tuple) and 3 <= len(batches) <= 4 and not isinstance(batches[0], (tuple, list, Batch)):
        return [batches]
    return batches


def coerce_batch(item: Any) -> pb.TraceBatch:
    if isinstance(item, pb.TraceBatch):
        return item
    if isinstance(item, dict):
        return to_trace_batch(item["site"], item["activations"], item["trace_ids"], item.get("positions"))
    if not isinstance(item, (tuple, list)) or not 3 <= len(item) <= 4:
        raise ValueError(
            "each batch must be (site, activations, trace_ids) or (site, activations, trace_ids, positions)"
        )
    return to_trace_batch(*item)
