"""The actwatch gRPC client: monitors, reference ingest, fitting, scoring, flags and the score log.

Every call maps to one RPC of ``actwatch.v1.ActivationMonitor`` (see proto/actwatch/v1/actwatch.proto).
Results come back as plain dataclasses; ``ScoreResult.traces_table()`` / ``computations_table()``
give numpy columns. Every gRPC failure is raised as :class:`ActwatchError` carrying the status code
and the server's message. Bidirectional and client streams are bridged with a queue and grpc's own
request-consuming thread, so ``send`` never waits for the server unless the send queue is full.
"""

from __future__ import annotations

import datetime as _dt
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import grpc
import numpy as np

from ._proto.actwatch.v1 import actwatch_pb2 as pb
from ._proto.actwatch.v1 import actwatch_pb2_grpc as pb_grpc
from .tensors import Batch, as_batches, coerce_batch, split_batch, to_trace_batch

__all__ = [
    "ActwatchError",
    "Batch",
    "Client",
    "ComputationScore",
    "DetectorScore",
    "FitPhase",
    "FitReport",
    "FlagWatch",
    "IngestSession",
    "IngestSummary",
    "KnnRecall",
    "MonitorInfo",
    "MonitorSpec",
    "ScoreResult",
    "ScoreStream",
    "SiteInfo",
    "SlotPValue",
    "TraceResults",
    "TraceScore",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Tensor bytes per wire batch when the client splits large batches (ingest and streams). Stays well
# under gRPC's customary 4 MiB message limit.
DEFAULT_MAX_BATCH_BYTES = 2 << 20
# Requests buffered between `send` and the wire before `send` blocks (backpressure).
DEFAULT_SEND_QUEUE = 64
_MAX_MESSAGE = 256 << 20


# --------------------------------------------------------------------------------------- errors


class ActwatchError(Exception):
    """A failed RPC: ``code`` is the ``grpc.StatusCode``, ``message`` the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "ActwatchError":
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def _wrap(err: grpc.RpcError) -> ActwatchError:
    return ActwatchError.from_rpc_error(err)


# ---------------------------------------------------------------------------------- dataclasses


@dataclass
class MonitorSpec:
    detectors: list[str] = field(default_factory=list)
    fusion: str = ""
    fpr: float = 0.0
    calibration_fraction: float = 0.0
    seed: int = 0

    @classmethod
    def _from_pb(cls, m: pb.MonitorSpec) -> "MonitorSpec":
        return cls(list(m.detectors), m.fusion, m.fpr, m.calibration_fraction, m.seed)


@dataclass
class SiteInfo:
    name: str
    width: int
    reference_rows: int


@dataclass
class KnnRecall:
    site: str
    detector: str
    queries: int
    k: int
    recall: float


@dataclass
class FitReport:
    fit_version: int
    reference_rows: int
    calibration_computations: int
    calibration_fpr: float
    fit_seconds: float
    calibration_seconds: float
    knn_recall: list[KnnRecall] = field(default_factory=list)
    #: Whether this fit was an incremental update (only new reference data folded in).
    incremental: bool = False
    #: Reference rows read by the fit pass (all of them for a full fit).
    rows_folded: int = 0

    @classmethod
    def _from_pb(cls, r: pb.FitReport) -> "FitReport":
        return cls(
            r.fit_version,
            r.reference_rows,
            r.calibration_computations,
            r.calibration_fpr,
            r.fit_seconds,
            r.calibration_seconds,
            [KnnRecall(k.site, k.detector, k.queries, k.k, k.recall) for k in r.knn_recall],
            r.incremental,
            r.rows_folded,
        )


@dataclass
class FitPhase:
    """Progress of a fit: ``name`` is "fit" or "calibrate"."""

    name: str
    rows_done: int
    rows_total: int


@dataclass
class MonitorInfo:
    name: str
    spec: MonitorSpec
    sites: list[SiteInfo]
    reference_rows: int
    fitted: bool
    fit_version: int
    report: Optional[FitReport]

    @classmethod
    def _from_pb(cls, m: pb.MonitorInfo) -> "MonitorInfo":
        return cls(
            m.name,
            MonitorSpec._from_pb(m.spec),
            [SiteInfo(s.name, s.width, s.reference_rows) for s in m.sites],
            m.reference_rows,
            m.fitted,
            m.fit_version,
            FitReport._from_pb(m.report) if m.HasField("report") else None,
        )

    def site(self, name: str) -> Optional[SiteInfo]:
        return next((s for s in self.sites if s.name == name), None)


@dataclass
class IngestSummary:
    rows: int
    bytes: int
    batches: int
    total_rows: int


@dataclass
class DetectorScore:
    detector: str
    raw: float
    p_value: float


@dataclass
class TraceScore:
    """One trace (one row of one batch): fused over the site's detectors, calibrated per site."""

    trace_id: str
    site: str
    position: Optional[int]
    score: float
    p_value: float
    flagged: bool
    detectors: list[DetectorScore]

    @classmethod
    def _from_pb(cls, t: pb.TraceScore) -> "TraceScore":
        return cls(
            t.trace_id,
            t.site,
            t.position if t.HasField("position") else None,
            t.score,
            t.p_value,
            t.flagged,
            [DetectorScore(d.detector, d.raw, d.p_value) for d in t.detectors],
        )


@dataclass
class SlotPValue:
    site: str
    detector: str
    p_value: Optional[float]


@dataclass
class ComputationScore:
    """One computation (all traces sharing a trace id), calibrated among calibration computations."""

    monitor: str
    trace_id: str
    score: float
    p_value: float
    flagged: bool
    traces: int
    slots: list[SlotPValue]
    scored_at_unix_ms: int
    fit_version: int

    @classmethod
    def _from_pb(cls, c: pb.ComputationScore) -> "ComputationScore":
        return cls(
            c.monitor,
            c.trace_id,
            c.score,
            c.p_value,
            c.flagged,
            c.traces,
            [SlotPValue(s.site, s.detector, s.p_value if s.HasField("p_value") else None) for s in c.slots],
            c.scored_at_unix_ms,
            c.fit_version,
        )

    @property
    def p_values(self) -> dict[tuple[str, str], Optional[float]]:
        """{(site, detector): p-value of the computation's most anomalous trace there}."""
        return {(s.site, s.detector): s.p_value for s in self.slots}

    @property
    def scored_at(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.scored_at_unix_ms / 1000, tz=_dt.timezone.utc)


def _traces_table(traces: Sequence[TraceScore]) -> dict[str, np.ndarray]:
    detectors = sorted({d.detector for t in traces for d in t.detectors})
    out = {
        "trace_id": np.array([t.trace_id for t in traces], dtype=object),
        "site": np.array([t.site for t in traces], dtype=object),
        "position": np.array([-1 if t.position is None else t.position for t in traces], dtype=np.int64),
        "score": np.array([t.score for t in traces], dtype=np.float64),
        "p_value": np.array([t.p_value for t in traces], dtype=np.float64),
        "flagged": np.array([t.flagged for t in traces], dtype=bool),
    }
    for name in detectors:
        by = [{d.detector: d for d in t.detectors}.get(name) for t in traces]
        out[f"raw_{name}"] = np.array([np.nan if d is None else d.raw for d in by], dtype=np.float64)
        out[f"p_{name}"] = np.array([np.nan if d is None else d.p_value for d in by], dtype=np.float64)
    return out


def _computations_table(comps: Sequence[ComputationScore]) -> dict[str, np.ndarray]:
    slots = sorted({(s.site, s.detector) for c in comps for s in c.slots})
    out = {
        "trace_id": np.array([c.trace_id for c in comps], dtype=object),
        "score": np.array([c.score for c in comps], dtype=np.float64),
        "p_value": np.array([c.p_value for c in comps], dtype=np.float64),
        "flagged": np.array([c.flagged for c in comps], dtype=bool),
        "traces": np.array([c.traces for c in comps], dtype=np.int64),
        "scored_at_unix_ms": np.array([c.scored_at_unix_ms for c in comps], dtype=np.int64),
    }
    for site, det in slots:
        vals = [c.p_values.get((site, det)) for c in comps]
        out[f"p_{site}_{det}"] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
    return out


@dataclass
class ScoreResult:
    """Per-trace results (in request order) and, with ``complete``, one result per computation."""

    traces: list[TraceScore]
    computations: list[ComputationScore]

    def traces_table(self) -> dict[str, np.ndarray]:
        """Columns as numpy arrays: trace_id, site, position (-1: none), score, p_value, flagged,
        raw_<detector>, p_<detector>."""
        return _traces_table(self.traces)

    def computations_table(self) -> dict[str, np.ndarray]:
        """Columns as numpy arrays: trace_id, score, p_value, flagged, traces, scored_at_unix_ms,
        p_<site>_<detector> (NaN where the computation had no trace at the site)."""
        return _computations_table(self.computations)

    def computation(self, trace_id: str) -> Optional[ComputationScore]:
        return next((c for c in self.computations if c.trace_id == trace_id), None)


@dataclass
class TraceResults:
    """Per-trace results of one batch sent on a :class:`ScoreStream`."""

    traces: list[TraceScore]

    def table(self) -> dict[str, np.ndarray]:
        return _traces_table(self.traces)


# ------------------------------------------------------------------------------------- sessions

_END = object()


class _RequestQueue:
    """A request iterator fed from another thread; ``put`` fails fast once the call has ended."""

    def __init__(self, maxsize: int):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.closed = False

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    def put(self, item: Any, call_done: Callable[[], bool]) -> None:
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


class _CallEnded(Exception):
    pass


class IngestSession:
    """A long-lived ``IngestReference`` stream: ``send`` batches, then ``close()`` for the summary.

    The summary arrives once every batch is durable on the server. Leaving a ``with`` block by an
    exception cancels the stream (the server must then not keep a partial ingest).
    """

    def __init__(self, stub: pb_grpc.ActivationMonitorStub, monitor: str, max_batch_bytes: int, timeout=None):
        self.monitor = monitor
        self._max_batch_bytes = max_batch_bytes
        self._requests = _RequestQueue(DEFAULT_SEND_QUEUE)
        self._first = True
        self._future = stub.IngestReference.future(iter(self._requests), timeout=timeout)
        self._summary: Optional[IngestSummary] = None

    def send(self, site: Any, activations: Any, trace_ids: Iterable[Any], positions: Any = None) -> None:
        self.send_batch(to_trace_batch(site, activations, trace_ids, positions))

    def send_batch(self, batch: pb.TraceBatch) -> None:
        if self._requests.closed:
            raise RuntimeError("ingest session is closed")
        for part in split_batch(batch, self._max_batch_bytes):
            # `monitor` is required in the first message; repeating it is allowed and harmless.
            req = pb.IngestReferenceRequest(monitor=self.monitor, batch=part)
            try:
                self._requests.put(req, self._future.done)
            except _CallEnded:
                self._raise_call_error()
                raise RuntimeError("ingest stream ended early")

    def _raise_call_error(self) -> None:
        try:
            self._future.result()
        except grpc.RpcError as e:
            raise _wrap(e) from None
        except grpc.FutureCancelledError:
            raise ActwatchError(grpc.StatusCode.CANCELLED, "ingest stream cancelled") from None

    def close(self, timeout: Optional[float] = None) -> IngestSummary:
        """Ends the stream and waits for the server's summary (all batches durable)."""
        if self._summary is not None:
            return self._summary
        self._requests.end()
        try:
            s = self._future.result(timeout=timeout)
        except grpc.RpcError as e:
            raise _wrap(e) from None
        except grpc.FutureCancelledError:
            raise ActwatchError(grpc.StatusCode.CANCELLED, "ingest stream cancelled") from None
        self._summary = IngestSummary(s.rows, s.bytes, s.batches, s.total_rows)
        return self._summary

    def cancel(self) -> None:
        """Abandons the stream; nothing sent on it should be kept by the server."""
        self._requests.end()
        self._future.cancel()

    def __enter__(self) -> "IngestSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()


class ScoreStream:
    """A ``StreamScores`` session: ``send`` trace batches, ``complete`` computations, iterate results.

    Iterating yields :class:`TraceResults` (the per-trace scores of each batch sent, in order; a batch
    larger than the client's split size comes back in several parts) and :class:`ComputationScore`
    (one per completed computation). A background thread reads the responses into a queue, so
    sending and reading may happen in different threads or interleaved in one. ``close()``
    half-closes the stream (results still arrive); iteration ends when the server ends the stream; a
    server error is raised from the iterator (and from later ``send`` calls) as ActwatchError.
    """

    def __init__(self, stub: pb_grpc.ActivationMonitorStub, monitor: str, max_batch_bytes: int, timeout=None):
        self.monitor = monitor
        self._max_batch_bytes = max_batch_bytes
        self._requests = _RequestQueue(DEFAULT_SEND_QUEUE)
        self._requests.put(pb.StreamScoresRequest(monitor=monitor), lambda: False)
        self._results: queue.Queue = queue.Queue()
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
                    self._results.put(TraceResults([TraceScore._from_pb(t) for t in resp.traces.traces]))
                elif kind == "computation":
                    self._results.put(ComputationScore._from_pb(resp.computation))
        except grpc.RpcError as e:
            if not (self._cancelled and e.code() == grpc.StatusCode.CANCELLED):
                self._error = _wrap(e)
                self._results.put(self._error)
        finally:
            self._ended.set()
            self._results.put(_END)

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

    def send(self, site: Any, activations: Any, trace_ids: Iterable[Any], positions: Any = None) -> None:
        """Queues traces of one site for scoring (their results arrive as TraceResults)."""
        self.send_batch(to_trace_batch(site, activations, trace_ids, positions))

    def send_batch(self, batch: pb.TraceBatch) -> None:
        for part in split_batch(batch, self._max_batch_bytes):
            self._put(pb.StreamScoresRequest(batch=part))

    def complete(self, trace_ids: Iterable[Any]) -> None:
        """Marks computations complete: one ComputationScore arrives for each."""
        ids = [t if isinstance(t, str) else str(t) for t in trace_ids]
        if ids:
            self._put(pb.StreamScoresRequest(complete=pb.CompleteComputations(trace_ids=ids)))

    def close(self) -> None:
        """Half-closes: no more sends; results already due still arrive."""
        self._requests.end()

    def cancel(self) -> None:
        self._cancelled = True
        self._requests.end()
        self._call.cancel()

    def get(self, timeout: Optional[float] = None) -> Union[TraceResults, ComputationScore]:
        """The next result; TimeoutError after ``timeout`` seconds, StopIteration at the end."""
        try:
            item = self._results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no result within {timeout} s") from None
        if item is _END:
            self._results.put(_END)  # stay ended for later readers
            raise StopIteration
        if isinstance(item, ActwatchError):
            raise item
        return item

    def __iter__(self) -> Iterator[Union[TraceResults, ComputationScore]]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def computations(self, n: Optional[int] = None, timeout: Optional[float] = None) -> list[ComputationScore]:
        """Reads results until ``n`` computation results have arrived (or the stream ends), dropping
        per-trace results. ``timeout`` bounds the wait for each result."""
        out: list[ComputationScore] = []
        while n is None or len(out) < n:
            try:
                item = self.get(timeout=timeout)
            except StopIteration:
                break
            if isinstance(item, ComputationScore):
                out.append(item)
        return out

    def __enter__(self) -> "ScoreStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()


class FlagWatch:
    """Flagged computations as they are scored: iterate it; ``cancel()`` (or ``with``) to stop."""

    def __init__(self, stub: pb_grpc.ActivationMonitorStub, request: pb.WatchFlagsRequest, ready_timeout: Optional[float]):
        self._cancelled = False
        self._call = stub.WatchFlags(request)
        if ready_timeout is not None:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Waits until the server has answered with response headers, i.e. the watch is registered."""
        done = threading.Event()
        result: dict[str, Any] = {}

        def headers():
            try:
                result["md"] = self._call.initial_metadata()
            except Exception as e:  # noqa: BLE001 - reported below
                result["err"] = e
            done.set()

        threading.Thread(target=headers, daemon=True).start()
        if not done.wait(timeout):
            raise TimeoutError(f"WatchFlags not acknowledged by the server within {timeout} s")
        if "err" in result and isinstance(result["err"], grpc.RpcError):
            raise _wrap(result["err"])
        if self._call.done() and self._call.code() not in (None, grpc.StatusCode.OK):
            raise ActwatchError(self._call.code(), self._call.details() or "")

    def __iter__(self) -> Iterator[ComputationScore]:
        try:
            for event in self._call:
                yield ComputationScore._from_pb(event.computation)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise _wrap(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> "FlagWatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.cancel()


# --------------------------------------------------------------------------------------- client

MonitorRef = Union[str, MonitorInfo]


def _name(monitor: MonitorRef) -> str:
    return monitor.name if isinstance(monitor, MonitorInfo) else str(monitor)


def _unix_ms(t: Union[None, int, float, _dt.datetime]) -> int:
    if t is None:
        return 0
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.astimezone()
        return int(t.timestamp() * 1000)
    return int(t)


class Client:
    """A connection to an actwatch server.

    ``timeout`` is the deadline in seconds for unary calls (None: no deadline). Streams have none
    by default; pass ``timeout=`` to the stream methods. Use as a context manager or ``close()``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: Optional[float] = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        channel: Optional[grpc.Channel] = None,
        options: Sequence[tuple[str, Any]] = (),
    ):
        self.address = address
        self.timeout = timeout
        self.max_batch_bytes = max_batch_bytes
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                *options,
            ],
        )
        self.stub = pb_grpc.ActivationMonitorStub(self.channel)

    # -- lifecycle

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Waits until the channel is connected (TimeoutError otherwise)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"actwatch server at {self.address} not reachable within {timeout} s") from None

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e) from None

    # -- monitors

    def create_monitor(
        self,
        name: str,
        detectors: Optional[Sequence[str]] = None,
        fusion: Optional[str] = None,
        fpr: Optional[float] = None,
        calibration_fraction: Optional[float] = None,
        seed: int = 0,
    ) -> MonitorInfo:
        """Creates an empty monitor. None means the server's default (see MonitorSpec in the proto):
        detectors gaussian and knn, fusion minp, fpr 0.01, calibration_fraction 0.25."""
        if isinstance(detectors, str):
            detectors = [detectors]
        spec = pb.MonitorSpec(
            detectors=list(detectors or []),
            fusion=fusion or "",
            fpr=fpr or 0.0,
            calibration_fraction=calibration_fraction or 0.0,
            seed=seed,
        )
        return MonitorInfo._from_pb(self._unary(self.stub.CreateMonitor, pb.CreateMonitorRequest(name=name, spec=spec)))

    def get_monitor(self, name: MonitorRef) -> MonitorInfo:
        return MonitorInfo._from_pb(self._unary(self.stub.GetMonitor, pb.GetMonitorRequest(name=_name(name))))

    def list_monitors(self) -> list[MonitorInfo]:
        resp = self._unary(self.stub.ListMonitors, pb.ListMonitorsRequest())
        return [MonitorInfo._from_pb(m) for m in resp.monitors]

    def delete_monitor(self, name: MonitorRef) -> None:
        self._unary(self.stub.DeleteMonitor, pb.DeleteMonitorRequest(name=_name(name)))

    # -- reference data and fitting

    def ingest_session(self, monitor: MonitorRef, timeout: Optional[float] = None) -> IngestSession:
        """Opens a reference-ingest stream to ``send`` batches on; ``close()`` returns the summary."""
        return IngestSession(self.stub, _name(monitor), self.max_batch_bytes, timeout=timeout)

    def ingest_reference(self, monitor: MonitorRef, batches: Iterable[Any], timeout: Optional[float] = None) -> IngestSummary:
        """Appends trusted reference traces; returns once the server has made them durable.

        ``batches``: an iterable of ``(site, activations, trace_ids[, positions])`` (or :class:`Batch`),
        ``activations`` a 2-D numpy array or torch tensor sent in its own dtype (f32, f16, bf16).
        Large batches are split by rows. If reading or encoding a batch fails, the stream is
        cancelled and the error re-raised: nothing of this call should be kept.
        """
        session = self.ingest_session(monitor, timeout=timeout)
        try:
            for item in as_batches(batches):
                session.send_batch(coerce_batch(item))
        except BaseException:
            session.cancel()
            raise
        return session.close()

    def fit(
        self,
        monitor: MonitorRef,
        on_progress: Optional[Callable[[FitPhase], None]] = None,
        timeout: Optional[float] = None,
        incremental: bool = False,
    ) -> FitReport:
        """Fits and calibrates the monitor; calls ``on_progress(FitPhase)`` as phases advance and
        returns the final report. With ``incremental=True`` only the reference data ingested since
        the last fit is folded into the saved fit state before recalibrating (the same monitor as a
        full fit, faster); without saved state it fits in full, and ``report.incremental`` says
        which one ran."""
        report = None
        req = pb.FitRequest(monitor=_name(monitor), incremental=incremental)
        try:
            for ev in self.stub.Fit(req, timeout=timeout):
                kind = ev.WhichOneof("event")
                if kind == "phase" and on_progress is not None:
                    on_progress(FitPhase(ev.phase.name, ev.phase.rows_done, ev.phase.rows_total))
                elif kind == "report":
                    report = FitReport._from_pb(ev.report)
        except grpc.RpcError as e:
            raise _wrap(e) from None
        if report is None:
            raise ActwatchError(grpc.StatusCode.UNKNOWN, "Fit stream ended without a report")
        return report

    # -- scoring

    def score(self, monitor: MonitorRef, batches: Iterable[Any], complete: bool = True) -> ScoreResult:
        """Scores batches in one request: per-trace results, and with ``complete`` one result per
        computation (each computation's traces must all be in this call). For large or continuous
        volumes use :meth:`stream_scores`."""
        req = pb.ScoreRequest(
            monitor=_name(monitor),
            batches=[coerce_batch(b) for b in as_batches(batches)],
            complete=complete,
        )
        resp = self._unary(self.stub.Score, req)
        return ScoreResult(
            [TraceScore._from_pb(t) for t in resp.traces],
            [ComputationScore._from_pb(c) for c in resp.computations],
        )

    def stream_scores(self, monitor: MonitorRef, timeout: Optional[float] = None) -> ScoreStream:
        """Opens a streaming scoring session (see :class:`ScoreStream`)."""
        return ScoreStream(self.stub, _name(monitor), self.max_batch_bytes, timeout=timeout)

    def watch_flags(
        self,
        monitors: Iterable[MonitorRef] = (),
        max_p_value: float = 0.0,
        ready_timeout: Optional[float] = 10.0,
    ) -> FlagWatch:
        """Streams flagged computations (:class:`ComputationScore`) of the given monitors (all when
        empty) with p-value <= ``max_p_value`` (0: every flag). Waits up to ``ready_timeout`` seconds
        for the server to acknowledge the watch (None: don't wait), so flags raised after this
        returns are not missed."""
        if isinstance(monitors, (str, MonitorInfo)):
            monitors = [monitors]
        req = pb.WatchFlagsRequest(monitors=[_name(m) for m in monitors], max_p_value=max_p_value)
        return FlagWatch(self.stub, req, ready_timeout)

    def query_scores(
        self,
        monitor: MonitorRef,
        trace_ids: Iterable[Any] = (),
        since: Union[None, int, _dt.datetime] = None,
        until: Union[None, int, _dt.datetime] = None,
        flagged_only: bool = False,
        limit: int = 0,
    ) -> list[ComputationScore]:
        """Recent computation results from the durable score log, most recent first. ``since`` /
        ``until``: ms since the Unix epoch or datetimes (None: unbounded); ``limit`` 0: the
        server's default."""
        if isinstance(trace_ids, str):
            trace_ids = [trace_ids]
        req = pb.QueryScoresRequest(
            monitor=_name(monitor),
            trace_ids=[t if isinstance(t, str) else str(t) for t in trace_ids],
            since_unix_ms=_unix_ms(since),
            until_unix_ms=_unix_ms(until),
            flagged_only=flagged_only,
            limit=limit,
        )
        resp = self._unary(self.stub.QueryScores, req)
        return [ComputationScore._from_pb(c) for c in resp.results]
