"""Type aliases of the client's inputs: activations, trace ids, positions, batches.

Only for annotations: nothing here is checked at run time beyond what the functions that take these
types check themselves (2-D activations, one trace id and position per row). torch is never imported:
a tensor is described structurally by :class:`TensorLike`, which ``torch.Tensor`` satisfies.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Protocol, TypedDict, Union

import numpy as np
import numpy.typing as npt

from ._proto.actwatch.v1 import actwatch_pb2 as pb
from .results import Provenance

__all__ = [
    "ArrayLike",
    "BatchDict",
    "BatchLike",
    "BatchTuple",
    "BatchesLike",
    "ChannelOption",
    "Labels",
    "PemLike",
    "Positions",
    "Site",
    "TensorLike",
    "Timestamp",
    "TraceId",
    "TraceIds",
]


class TensorLike(Protocol):
    """A ``torch.Tensor``, described by the members the client relies on (torch is not imported)."""

    @property
    def shape(self) -> tuple[int, ...]: ...  # torch.Size is a tuple of ints

    @property
    def dtype(self) -> object: ...

    def dim(self) -> int: ...

    def detach(self) -> TensorLike: ...


#: Activations [rows, d]: a numpy array (float32, float16, ml_dtypes bfloat16; float64 and integers
#: are cast to float32), a torch tensor (float32, float16, bfloat16; any device), or anything
#: ``np.asarray`` turns into a 2-D array (e.g. a list of rows).
ArrayLike = Union[TensorLike, npt.ArrayLike]

#: One trace id: sent as a string (``str(id)``; bytes are decoded as UTF-8, numpy scalars unwrapped).
TraceId = Union[str, bytes, int, np.integer]

#: One trace id per row: a sequence (not a single string) or a 1-D numpy array.
TraceIds = Union[Sequence[TraceId], npt.NDArray[np.generic]]

#: One token position per row: a sequence of ints, an integer numpy array or an integer torch tensor.
Positions = Union[Sequence[int], npt.NDArray[np.integer], TensorLike]

#: Labels of labelled examples for a monitor's concept probes (True: the concept is present): one bool
#: for every row, one per row (a sequence, a 1-D bool numpy array or a bool torch tensor), or a mapping
#: {trace id (as sent: a string): bool}, each row labelled by its computation. One label per computation.
Labels = Union[bool, np.bool_, Sequence[bool], npt.NDArray[np.bool_], TensorLike, Mapping[str, bool]]

#: A site name (an int is sent as its decimal string).
Site = Union[str, int]

#: ``(site, activations, trace_ids)``, ``(site, activations, trace_ids, positions)`` or
#: ``(site, activations, trace_ids, positions, provenance)``; :class:`actwatch_client.Batch` is one of
#: these.
BatchTuple = Union[
    tuple[Site, ArrayLike, TraceIds],
    tuple[Site, ArrayLike, TraceIds, Optional[Positions]],
    tuple[Site, ArrayLike, TraceIds, Optional[Positions], Optional[Provenance]],
]


class _BatchDictRequired(TypedDict):
    site: Site
    activations: ArrayLike
    trace_ids: TraceIds


class BatchDict(_BatchDictRequired, total=False):
    """A batch as a mapping: ``site``, ``activations``, ``trace_ids`` and optionally ``positions`` and
    ``provenance``."""

    positions: Optional[Positions]
    provenance: Optional[Provenance]


#: One batch of traces of one site: a tuple, a mapping, or an already encoded ``TraceBatch``.
BatchLike = Union[BatchTuple, BatchDict, pb.TraceBatch]

#: What ``ingest_reference`` and ``score`` take: an iterable of batches, or a single batch tuple.
BatchesLike = Union[BatchTuple, Iterable[BatchLike]]

#: A point in time: milliseconds since the Unix epoch, or a datetime (naive means local time).
Timestamp = Union[int, float, _dt.datetime]

#: A gRPC channel option, e.g. ``("grpc.keepalive_time_ms", 30000)``.
ChannelOption = tuple[str, Union[str, int]]

#: A PEM certificate or key (TLS options of ``Client``): its bytes, or the path of a PEM file (a str
#: starting with ``-----BEGIN`` is taken as the PEM text itself).
PemLike = Union[bytes, str, os.PathLike[str]]
