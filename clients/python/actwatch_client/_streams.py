"""Stream plumbing: the long-lived calls behind ``Client.ingest_session``, ``stream_scores`` and
``watch_flags``.

Client and bidirectional streams are fed from a queue that grpc's own request-consuming thread
drains, so ``send`` never waits for the server unless the send queue is full (backpressure).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Callable, Generic, Optional, TypeVar, Union

import grpc

from ._proto.actwatch.v1 import actwatch_pb2 as pb
from ._rpc import ActivationMonitorStub
from .errors import ActwatchError, warn_provenance_conflicts
from .results import ComputationScore, FlagEvent, IngestSummary, Provenance, TraceResults
from .tensors import row_labels, split_batch, split_labels, to_trace_batch, trace_id_strings, with_provenance
from .types import ArrayLike, Labels, Positions, Site, TraceIds

__all__ = ["DEFAULT_SEND_QUEUE", "EarlyFlagCallback", "FlagWatch", "IngestSession", "ScoreStream"]

_log = logging.getLogger("actwatch_client")

#: Called with each early flag (a partial, flagged :class:`ComputationScore`) of a score stream.
EarlyFlagCallback = Callable[[ComputationScore], object]

# Requests buffered between `send` and the wire before `send` blocks (backpressure).
DEFAULT_SEND_QUEUE = 64

_T = TypeVar("_T")


class _End(enum.Enum):
    """The end-of-stream marker in a queue."""

    END = enum.auto()


_END = _End.END


class _CallEnded(Exception):
    pass


class _RequestQueue(Generic[_T]):
    """A request iterator fed from another thread; ``put`` fails fast once the call has ended."""

    def __init__(self, maxsize: int):
        self._q: queue.Queue[Union[_T, _End]] = queue.Queue(maxsize=maxsize)
        self.closed = False

    def __iter__(self) -> Iterator[_T]:
        while True:
            item = self._q.get()
            if isinstance(item, _End):
                return
            yield item

    def put(self, item: _T, call_done: Callable[[], bool]) -> None:
        while True:
            if call_done():
                raise _CallEnded()
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def end(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._q.put_nowait(_END)
            except queue.Full:
                # The consumer is gone or slow; deliver the end marker from a helper thread.
                threading.Thread(target=self._q.put, args=(_END,), daemon=True).start()


class IngestSession:
    """A long-lived ``IngestReference`` stream: ``send`` batches, then ``close()`` for the summary.

    The summary arrives once every batch is durable on the server. Leaving a ``with`` block by an
    exception cancels the stream (the server must then not keep a partial ingest). ``provenance``:
    declared on every batch sent (fields a batch declares itself win). A batch whose provenance
    conflicts with what earlier reference batches of its site declared fails the whole stream
    (FAILED_PRECONDITION; nothing of it is kept).

    ``labels`` (per ``send``): the batch holds labelled examples for the monitor's concept probes, not
    reference traffic (see :data:`~actwatch_client.types.Labels`); a monitor without probes refuses them
    (INVALID_ARGUMENT, failing the stream), as it does a computation labelled both ways.
    """

    def __init__(
        self,
        stub: ActivationMonitorStub,
        monitor: str,
        max_batch_bytes: int,
        *,
        timeout: Optional[float] = None,
        provenance: Optional[Provenance] = None,
    ):
        self.monitor = monitor
        self.provenance = provenance
        self._max_batch_bytes = max_batch_bytes
        self._requests: _RequestQueue[pb.IngestReferenceRequest] = _RequestQueue(DEFAULT_SEND_QUEUE)
        self._future = stub.IngestReference.future(iter(self._requests), timeout=timeout)
        self._summary: Optional[IngestSummary] = None

    def send(
        self,
        site: Site,
        activations: ArrayLike,
        trace_ids: TraceIds,
        positions: Optional[Positions] = None,
        *,
        provenance: Optional[Provenance] = None,
        labels: Optional[Labels] = None,
    ) -> None:
        """Queues reference traces of one site (split by rows if large); ``provenance``: what produced
        them (its fields win over the session's). With ``labels`` (a bool for every row, one per row,
        or {trace id: bool}) they are labelled examples for the monitor's probes instead."""
        self.send_batch(to_trace_batch(site, activations, trace_ids, positions, provenance=provenance), labels=labels)

    def send_batch(self, batch: pb.TraceBatch, *, labels: Optional[Labels] = None) -> None:
        if self._requests.closed:
            raise RuntimeError("ingest session is closed")
        rows = row_labels(labels, batch.trace_ids)
        parts = split_batch(with_provenance(batch, self.provenance), self._max_batch_bytes)
        for part, part_labels in zip(parts, split_labels(rows, parts)):
            # `monitor` is required in the first message; repeating it is allowed and harmless.
            req = pb.IngestReferenceRequest(monitor=self.monitor, batch=part, labels=part_labels)
            try:
                self._requests.put(req, self._future.done)
            except _CallEnded:
                self._raise_call_error()
                raise RuntimeError("ingest stream ended early") from None

    def _raise_call_error(self) -> None:
        try:
            self._future.result()
        except grpc.RpcError as e:
            raise ActwatchError.from_rpc_error(e) from None
        except grpc.FutureCancelledError:
            raise ActwatchError(grpc.StatusCode.CANCELLED, "ingest stream cancelled") from None

    def close(self, *, timeout: Optional[float] = None) -> IngestSummary:
        """Ends the stream and waits for the server's summary (all batches durable)."""
        if self._summary is not None:
            return self._summary
        self._requests.end()
        try:
            s = self._future.result(timeout=timeout)
        except grpc.RpcError as e:
            raise ActwatchError.from_rpc_error(e) from None
        except grpc.FutureCancelledError:
            raise ActwatchError(grpc.StatusCode.CANCELLED, "ingest stream cancelled") from None
        self._summary = IngestSummary._from_pb(s)
        return self._summary

    def cancel(self) -> None:
        """Abandons the stream; nothing sent on it should be kept by the server."""
        self._requests.end()
        self._future.cancel()

    def __enter__(self) -> IngestSession:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()


#: What a :class:`ScoreStream` yields.
StreamResult = Union[TraceResults, ComputationScore]


class ScoreStream:
    """A ``StreamScores`` session: ``send`` trace batches, ``complete`` computations, iterate results.

    Iterating yields :class:`TraceResults` (the per-trace scores of each batch sent, in order; a batch
    larger than the client's split size comes back in several parts) and :class:`ComputationScore`
    (one per completed computation). A background thread reads the responses into a queue, so
    sending and reading may happen in different threads or interleaved in one. ``close()``
    half-closes the stream (results still arrive); iteration ends when the server ends the stream; a
    server error is raised from the iterator (and from later ``send`` calls) as ActwatchError.

    Early flags (monitors that flag early: aggregation max, ema or max_rolling_mean with minp or
    fisher fusion, the default monitor included): a computation that a batch made cross the
    threshold before it is complete is in that batch's ``TraceResults.early_flags`` (once, with
    ``partial=True`` and ``flagged_at``); its final ComputationScore still arrives at completion.
    ``on_early_flag``, if given, is also called with each of them by the reading thread as soon as
    the batch's response arrives (before the TraceResults is queued), so it sees them even when
    nobody reads the stream yet; an exception it raises is logged (logger "actwatch_client") and
    does not stop the stream.

    Provenance: ``provenance`` is declared on every batch sent (fields a batch declares itself win).
    A batch whose provenance conflicts with its site's recorded one ends the stream with
    FAILED_PRECONDITION, or, on a monitor with ``provenance_policy="warn"``, is scored with
    ``TraceResults.provenance_warnings`` set; then ``get`` (and iteration) also emits a
    :class:`~actwatch_client.ProvenanceMismatchWarning`, once per site for the stream.
    """

    def __init__(
        self,
        stub: ActivationMonitorStub,
        monitor: str,
        max_batch_bytes: int,
        *,
        timeout: Optional[float] = None,
        on_early_flag: Optional[EarlyFlagCallback] = None,
        provenance: Optional[Provenance] = None,
    ):
        self.monitor = monitor
        self.provenance = provenance
        self._max_batch_bytes = max_batch_bytes
        self._on_early_flag = on_early_flag
        self._warned_sites: set[str] = set()
        self._warned_lock = threading.Lock()
        self._requests: _RequestQueue[pb.StreamScoresRequest] = _RequestQueue(DEFAULT_SEND_QUEUE)
        self._requests.put(pb.StreamScoresRequest(monitor=monitor), lambda: False)
        self._results: queue.Queue[Union[StreamResult, ActwatchError, _End]] = queue.Queue()
        self._error: Optional[ActwatchError] = None
        self._ended = threading.Event()
        self._cancelled = False
        self._call = stub.StreamScores(iter(self._requests), timeout=timeout)
        self._reader = threading.Thread(target=self._read, name=f"actwatch-stream-{monitor}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for resp in self._call:
                kind = resp.WhichOneof("event")
                if kind == "traces":
                    traces = TraceResults._from_pb(resp.traces)
                    if self._on_early_flag is not None:
                        for flag in traces.early_flags:
                            self._call_on_early_flag(flag)
                    self._results.put(traces)
                elif kind == "computation":
                    self._results.put(ComputationScore._from_pb(resp.computation))
        except grpc.RpcError as e:
            if not (self._cancelled and e.code() == grpc.StatusCode.CANCELLED):
                self._error = ActwatchError.from_rpc_error(e)
                self._results.put(self._error)
        finally:
            self._ended.set()
            self._results.put(_END)

    def _call_on_early_flag(self, flag: ComputationScore) -> None:
        assert self._on_early_flag is not None
        try:
            self._on_early_flag(flag)
        except Exception:
            _log.exception("on_early_flag raised for %s (monitor %s)", flag.trace_id, self.monitor)

    def _call_done(self) -> bool:
        return self._ended.is_set()

    def _put(self, req: pb.StreamScoresRequest) -> None:
        if self._requests.closed:
            raise RuntimeError("score stream is closed")
        try:
            self._requests.put(req, self._call_done)
        except _CallEnded:
            if self._error is not None:
                raise self._error from None
            raise ActwatchError(grpc.StatusCode.CANCELLED, "score stream has ended") from None

    def send(
        self,
        site: Site,
        activations: ArrayLike,
        trace_ids: TraceIds,
        positions: Optional[Positions] = None,
        *,
        provenance: Optional[Provenance] = None,
    ) -> None:
        """Queues traces of one site for scoring (their results arrive as TraceResults); ``provenance``:
        what produced them (its fields win over the stream's)."""
        self.send_batch(to_trace_batch(site, activations, trace_ids, positions, provenance=provenance))

    def send_batch(self, batch: pb.TraceBatch) -> None:
        for part in split_batch(with_provenance(batch, self.provenance), self._max_batch_bytes):
            self._put(pb.StreamScoresRequest(batch=part))

    def complete(self, trace_ids: TraceIds) -> None:
        """Marks computations complete: one ComputationScore arrives for each."""
        ids = trace_id_strings(trace_ids)
        if ids:
            self._put(pb.StreamScoresRequest(complete=pb.CompleteComputations(trace_ids=ids)))

    def close(self) -> None:
        """Half-closes: no more sends; results already due still arrive."""
        self._requests.end()

    def cancel(self) -> None:
        self._cancelled = True
        self._requests.end()
        self._call.cancel()

    def get(self, *, timeout: Optional[float] = None) -> StreamResult:
        """The next result; TimeoutError after ``timeout`` seconds, StopIteration at the end."""
        try:
            item = self._results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no result within {timeout} s") from None
        if isinstance(item, _End):
            self._results.put(_END)  # stay ended for later readers
            raise StopIteration
        if isinstance(item, ActwatchError):
            raise item
        if isinstance(item, TraceResults) and item.provenance_warnings:
            with self._warned_lock:
                # stacklevel 2: the caller of get (or the stream's own __iter__ / computations).
                warn_provenance_conflicts(self.monitor, item.provenance_warnings, self._warned_sites, stacklevel=2)
        return item

    def __iter__(self) -> Iterator[StreamResult]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def computations(self, *, n: Optional[int] = None, timeout: Optional[float] = None) -> list[ComputationScore]:
        """Reads results until ``n`` computation results have arrived (or the stream ends), dropping
        per-trace results (and the early flags they carry: see ``on_early_flag``). ``timeout``
        bounds the wait for each result."""
        out: list[ComputationScore] = []
        while n is None or len(out) < n:
            try:
                item = self.get(timeout=timeout)
            except StopIteration:
                break
            if isinstance(item, ComputationScore):
                out.append(item)
        return out

    def __enter__(self) -> ScoreStream:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()


class FlagWatch:
    """Flagged computations as they are scored: iterate it for :class:`FlagEvent` (a
    :class:`ComputationScore` with ``raised_by``); ``cancel()`` (or ``with``) to stop.

    A computation is flagged as anomalous (``flagged``; "anomaly" in ``raised_by``) or by a concept
    probe (its name in ``raised_by``; ``flagged`` is False when only probes flagged it). Besides final
    results, it yields the early flags of score streams (``partial=True``: a computation flagged before
    it was complete); the final result of such a computation follows, flagged too, with the same
    ``flagged_at``. Skip ``c.partial`` ones to see each flag once."""

    def __init__(
        self,
        stub: ActivationMonitorStub,
        request: pb.WatchFlagsRequest,
        *,
        ready_timeout: Optional[float],
    ):
        self._cancelled = False
        self._call = stub.WatchFlags(request)
        if ready_timeout is not None:
            self.wait_ready(timeout=ready_timeout)

    def wait_ready(self, *, timeout: float = 10.0) -> None:
        """Waits until the server has answered with response headers, i.e. the watch is registered."""
        done = threading.Event()
        errors: list[Exception] = []

        def headers() -> None:
            try:
                self._call.initial_metadata()
            except Exception as e:
                errors.append(e)
            done.set()

        threading.Thread(target=headers, daemon=True).start()
        if not done.wait(timeout):
            raise TimeoutError(f"WatchFlags not acknowledged by the server within {timeout} s")
        if errors and isinstance(errors[0], grpc.RpcError):
            raise ActwatchError.from_rpc_error(errors[0])
        if not self._call.is_active() and self._call.code() not in (None, grpc.StatusCode.OK):
            raise ActwatchError(self._call.code(), self._call.details() or "")

    def __iter__(self) -> Iterator[FlagEvent]:
        try:
            for event in self._call:
                yield FlagEvent._from_pb(event)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise ActwatchError.from_rpc_error(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> FlagWatch:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.cancel()
