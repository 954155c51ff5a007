"""Activations to wire tensors: numpy arrays and torch tensors, sent in their own dtype.

The wire carries f32, f16 and bf16 as little-endian, row-major bytes (``actwatch.v1.Tensor``). An
array is sent as it is: float16 stays float16, bfloat16 stays bfloat16 (no up-cast, the server
converts once). float64 (numpy's default) has no wire type and is cast down to float32. torch is
never imported here: a tensor is recognised only if torch is already loaded.

A batch may declare its :class:`~actwatch_client.Provenance` (what produced it). Where both a batch and
the call that sends it declare one (``ingest_reference(..., provenance=)``, ``score``, the stream
sessions), the fields the batch declares win and the call's fill the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, cast

import numpy as np
import numpy.typing as npt

from ._proto.actwatch.v1 import actwatch_pb2 as pb
from .results import Provenance, merge_provenance
from .types import ArrayLike, BatchesLike, BatchLike, Labels, Positions, Site, TensorLike, TraceId, TraceIds

__all__ = ["Batch", "row_labels", "split_batch", "split_labels", "to_tensor", "to_trace_batch", "with_provenance"]


class Batch(NamedTuple):
    """Traces of one site: ``activations`` is [rows, d], one trace id (and position) per row;
    ``provenance``: what produced them (None: nothing declared)."""

    site: Site
    activations: ArrayLike
    trace_ids: TraceIds
    positions: Optional[Positions] = None
    provenance: Optional[Provenance] = None


_NUMPY_DTYPES: dict[np.dtype[np.generic], pb.DType] = {
    np.dtype(np.float32): pb.DTYPE_F32,
    np.dtype(np.float16): pb.DTYPE_F16,
}


def _torch_tensor_type() -> Optional[type]:
    torch = sys.modules.get("torch")
    tensor = getattr(torch, "Tensor", None) if torch is not None else None
    return tensor if isinstance(tensor, type) else None


def _torch_to_numpy(tensor: TensorLike) -> tuple[npt.NDArray[np.generic], pb.DType]:
    torch = sys.modules["torch"]
    # torch is not a dependency (and not imported by this module), so its tensors are untyped here.
    t = cast(Any, tensor).detach()
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


def _numpy_to_wire(a: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], pb.DType]:
    if a.dtype.name == "bfloat16":  # ml_dtypes / jax bfloat16
        return a.view(np.uint16), pb.DTYPE_BF16
    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in ("=", "|") else a.dtype
    if dt in _NUMPY_DTYPES:
        return a, _NUMPY_DTYPES[dt]
    if dt == np.float64:
        return a.astype(np.float32), pb.DTYPE_F32
    raise ValueError(f"activations must be float32, float16 or bfloat16 (float64 is cast to float32), got {a.dtype}")


def _is_torch_tensor(x: object) -> bool:
    torch_tensor = _torch_tensor_type()
    return torch_tensor is not None and isinstance(x, torch_tensor)


def to_tensor(activations: ArrayLike) -> pb.Tensor:
    """Encodes a 2-D array-like ([rows, d]) as a wire tensor in its own dtype.

    Accepts numpy arrays (float32, float16, ml_dtypes bfloat16; float64 is cast to float32), torch
    tensors (float32, float16, bfloat16, on any device) and anything ``np.asarray`` takes (as float32
    unless it is already a float array).
    """
    if _is_torch_tensor(activations):
        arr, dtype = _torch_to_numpy(cast(TensorLike, activations))
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


def _id(t: TraceId) -> str:
    if isinstance(t, bytes):
        return t.decode()
    if isinstance(t, np.generic):
        return str(t.item())
    return t if isinstance(t, str) else str(t)


def trace_id_strings(trace_ids: TraceIds) -> list[str]:
    """Trace ids as sent: strings, one per element (a single string is rejected, not split)."""
    if isinstance(trace_ids, (str, bytes)):
        raise ValueError("trace_ids must be a sequence with one id per row, not a single string")
    return [_id(t) for t in trace_ids]


def _positions(positions: Optional[Positions]) -> list[int]:
    if positions is None:
        return []
    if _is_torch_tensor(positions):
        positions = cast(Any, positions).detach().cpu().numpy()
    return [int(p) for p in np.asarray(positions).reshape(-1)]


def row_labels(labels: Optional[Labels], trace_ids: Sequence[str]) -> Optional[list[bool]]:
    """``labels`` as sent with a batch of rows with these trace ids (``IngestReferenceRequest.labels``):
    None (reference traffic), one bool for every row, or one per row. A mapping labels each row by its
    trace id (each id must be in it). Raises TypeError for non-bool labels, ValueError for a count or
    an id that does not match the rows."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        missing = [t for t in dict.fromkeys(trace_ids) if t not in labels]
        if missing:
            raise ValueError(f"labels has no label for trace id {missing[0]!r} ({len(missing)} ids missing)")
        labels = [labels[t] for t in trace_ids]
    if _is_torch_tensor(labels):
        labels = cast(Any, labels).detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.dtype != np.bool_ and not (arr.size == 0 and arr.ndim == 1):
        raise TypeError(f"labels must be bools (True: the concept is present), got {arr.dtype} values")
    if arr.ndim == 0:
        return [bool(arr)]
    if arr.ndim != 1 or len(arr) != len(trace_ids):
        raise ValueError(f"{arr.size} labels for {len(trace_ids)} rows (give one bool for every row, or one per row)")
    return [bool(x) for x in arr]


def split_labels(labels: Optional[list[bool]], parts: Sequence[pb.TraceBatch]) -> list[list[bool]]:
    """The labels of each part of a batch split by :func:`split_batch`: a single label (or none) goes
    with every part, one per row is sliced along."""
    if labels is None or len(labels) <= 1 or len(parts) == 1:
        return [list(labels or []) for _ in parts]
    out, start = [], 0
    for part in parts:
        rows = len(part.trace_ids)
        out.append(labels[start : start + rows])
        start += rows
    return out


def _check_provenance(provenance: object) -> Optional[Provenance]:
    if provenance is not None and not isinstance(provenance, Provenance):
        raise TypeError(f"provenance must be an actwatch_client.Provenance or None, got {type(provenance).__name__}")
    return provenance


def to_trace_batch(
    site: Site,
    activations: ArrayLike,
    trace_ids: TraceIds,
    positions: Optional[Positions] = None,
    *,
    provenance: Optional[Provenance] = None,
) -> pb.TraceBatch:
    """Builds a ``TraceBatch``; checks locally that ids and positions match the rows. ``provenance``:
    what produced the activations (None: nothing declared)."""
    _check_provenance(provenance)
    tensor = to_tensor(activations)
    ids = trace_id_strings(trace_ids)
    pos = _positions(positions)
    rows = tensor.shape[0]
    if len(ids) != rows:
        raise ValueError(f"{len(ids)} trace ids for {rows} rows of activations (need one per row)")
    if pos and len(pos) != rows:
        raise ValueError(f"{len(pos)} positions for {rows} rows of activations (need none or one per row)")
    batch = pb.TraceBatch(site=str(site), activations=tensor, trace_ids=ids, positions=pos)
    if provenance is not None and provenance.declared():
        batch.provenance.CopyFrom(provenance._to_pb())
    return batch


def with_provenance(batch: pb.TraceBatch, provenance: Optional[Provenance]) -> pb.TraceBatch:
    """``batch`` declaring ``provenance`` too: the fields the batch declares itself win, the others come
    from ``provenance``. Returns ``batch`` itself when that adds nothing, else a copy (never mutates it)."""
    _check_provenance(provenance)
    if provenance is None or not provenance.declared():
        return batch
    own = Provenance._from_pb(batch.provenance)
    merged = merge_provenance(provenance, own)
    if merged == own:
        return batch
    assert merged is not None
    out = pb.TraceBatch()
    out.CopyFrom(batch)
    out.provenance.CopyFrom(merged._to_pb())
    return out


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
                provenance=batch.provenance if batch.HasField("provenance") else None,
            )
        )
    return parts


def as_batches(batches: BatchesLike) -> Iterable[BatchLike]:
    """A single (site, activations, trace_ids[, positions[, provenance]]) tuple is one batch, not an
    iterable of them."""
    if (
        isinstance(batches, tuple)
        and 3 <= len(batches) <= 5
        and not isinstance(batches[0], (tuple, list, dict, pb.TraceBatch))
    ):
        return [cast(BatchLike, batches)]
    return cast(Iterable[BatchLike], batches)


def coerce_batch(item: BatchLike, *, provenance: Optional[Provenance] = None) -> pb.TraceBatch:
    """One batch as a ``TraceBatch``: a tuple, a mapping or a ``TraceBatch`` (see :data:`BatchLike`).
    ``provenance`` (the call's) fills the provenance fields the batch does not declare itself."""
    _check_provenance(provenance)
    if isinstance(item, pb.TraceBatch):
        return with_provenance(item, provenance)
    if isinstance(item, dict):
        own = _check_provenance(item.get("provenance"))
        return to_trace_batch(
            item["site"],
            item["activations"],
            item["trace_ids"],
            item.get("positions"),
            provenance=merge_provenance(provenance, own),
        )
    if not isinstance(item, (tuple, list)) or not 3 <= len(item) <= 5:
        raise ValueError(
            "each batch must be (site, activations, trace_ids), (site, activations, trace_ids, positions) "
            "or (site, activations, trace_ids, positions, provenance)"
        )
    site, activations, trace_ids = item[0], item[1], item[2]
    positions = item[3] if len(item) > 3 else None
    own = _check_provenance(item[4]) if len(item) > 4 else None
    return to_trace_batch(site, activations, trace_ids, positions, provenance=merge_provenance(provenance, own))
