from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_BF16: DType

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class TraceBatch(_message.Message):
    __slots__ = ("site", "activations", "trace_ids", "positions", "provenance")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    site: str
    activations: Tensor
    trace_ids: _containers.RepeatedScalarFieldContainer[str]
    positions: _containers.RepeatedScalarFieldContainer[int]
    provenance: Provenance
    def __init__(self, site: _Optional[str] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., trace_ids: _Optional[_Iterable[str]] = ..., positions: _Optional[_Iterable[int]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("model", "revision", "capture", "pooling", "dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    revision: str
    capture: str
    pooling: str
    dtype: str
    def __init__(self, model: _Optional[str] = ..., revision: _Optional[str] = ..., capture: _Optional[str] = ..., pooling: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class ProvenanceWarning(_message.Message):
    __slots__ = ("site", "field", "declared", "recorded")
    SITE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    site: str
    field: str
    declared: str
    recorded: str
    def __init__(self, site: _Optional[str] = ..., field: _Optional[str] = ..., declared: _Optional[str] = ..., recorded: _Optional[str] = ...) -> None: ...

class MonitorSpec(_message.Message):
    __slots__ = ("detectors", "fusion", "fpr", "calibration_fraction", "seed", "aggregation", "joint", "length_strata", "provenance_policy", "probes")
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    FPR_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    JOINT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_STRATA_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    detectors: _containers.RepeatedScalarFieldContainer[str]
    fusion: str
    fpr: float
    calibration_fraction: float
    seed: int
    aggregation: str
    joint: str
    length_strata: int
    provenance_policy: str
    probes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, detectors: _Optional[_Iterable[str]] = ..., fusion: _Optional[str] = ..., fpr: _Optional[float] = ..., calibration_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., aggregation: _Optional[str] = ..., joint: _Optional[str] = ..., length_strata: _Optional[int] = ..., provenance_policy: _Optional[str] = ..., probes: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateMonitorRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: MonitorSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[MonitorSpec, _Mapping]] = ...) -> None: ...

class GetMonitorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListMonitorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMonitorsResponse(_message.Message):
    __slots__ = ("monitors",)
    MONITORS_FIELD_NUMBER: _ClassVar[int]
    monitors: _containers.RepeatedCompositeFieldContainer[MonitorInfo]
    def __init__(self, monitors: _Optional[_Iterable[_Union[MonitorInfo, _Mapping]]] = ...) -> None: ...

class DeleteMonitorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteMonitorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("name", "width", "reference_rows", "provenance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: int
    reference_rows: int
    provenance: Provenance
    def __init__(self, name: _Optional[str] = ..., width: _Optional[int] = ..., reference_rows: _Optional[int] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class MonitorInfo(_message.Message):
    __slots__ = ("name", "spec", "sites", "reference_rows", "fitted", "fit_version", "report", "damaged", "example_rows", "ingests")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    FITTED_FIELD_NUMBER: _ClassVar[int]
    FIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    INGESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: MonitorSpec
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    reference_rows: int
    fitted: bool
    fit_version: int
    report: FitReport
    damaged: str
    example_rows: int
    ingests: _containers.RepeatedCompositeFieldContainer[IngestInfo]
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[MonitorSpec, _Mapping]] = ..., sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ..., reference_rows: _Optional[int] = ..., fitted: _Optional[bool] = ..., fit_version: _Optional[int] = ..., report: _Optional[_Union[FitReport, _Mapping]] = ..., damaged: _Optional[str] = ..., example_rows: _Optional[int] = ..., ingests: _Optional[_Iterable[_Union[IngestInfo, _Mapping]]] = ...) -> None: ...

class IngestReferenceRequest(_message.Message):
    __slots__ = ("monitor", "batch", "labels")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    batch: TraceBatch
    labels: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, monitor: _Optional[str] = ..., batch: _Optional[_Union[TraceBatch, _Mapping]] = ..., labels: _Optional[_Iterable[bool]] = ...) -> None: ...

class IngestReferenceSummary(_message.Message):
    __slots__ = ("rows", "bytes", "batches", "total_rows", "example_rows", "total_example_rows", "ingest")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EXAMPLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    INGEST_FIELD_NUMBER: _ClassVar[int]
    rows: int
    bytes: int
    batches: int
    total_rows: int
    example_rows: int
    total_example_rows: int
    ingest: int
    def __init__(self, rows: _Optional[int] = ..., bytes: _Optional[int] = ..., batches: _Optional[int] = ..., total_rows: _Optional[int] = ..., example_rows: _Optional[int] = ..., total_example_rows: _Optional[int] = ..., ingest: _Optional[int] = ...) -> None: ...

class IngestInfo(_message.Message):
    __slots__ = ("id", "rows", "example_rows", "committed_unix_ms", "principal")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    id: int
    rows: int
    example_rows: int
    committed_unix_ms: int
    principal: str
    def __init__(self, id: _Optional[int] = ..., rows: _Optional[int] = ..., example_rows: _Optional[int] = ..., committed_unix_ms: _Optional[int] = ..., principal: _Optional[str] = ...) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("monitor", "incremental", "select", "skip_reference_check")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    SKIP_REFERENCE_CHECK_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    incremental: bool
    select: FitSelection
    skip_reference_check: bool
    def __init__(self, monitor: _Optional[str] = ..., incremental: _Optional[bool] = ..., select: _Optional[_Union[FitSelection, _Mapping]] = ..., skip_reference_check: _Optional[bool] = ...) -> None: ...

class FitSelection(_message.Message):
    __slots__ = ("ingests", "exclude_ingests", "committed_from_unix_ms", "committed_to_unix_ms")
    INGESTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_INGESTS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FROM_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TO_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ingests: _containers.RepeatedScalarFieldContainer[int]
    exclude_ingests: _containers.RepeatedScalarFieldContainer[int]
    committed_from_unix_ms: int
    committed_to_unix_ms: int
    def __init__(self, ingests: _Optional[_Iterable[int]] = ..., exclude_ingests: _Optional[_Iterable[int]] = ..., committed_from_unix_ms: _Optional[int] = ..., committed_to_unix_ms: _Optional[int] = ...) -> None: ...

class FitProgress(_message.Message):
    __slots__ = ("phase", "report")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    report: FitReport
    def __init__(self, phase: _Optional[_Union[Phase, _Mapping]] = ..., report: _Optional[_Union[FitReport, _Mapping]] = ...) -> None: ...

class Phase(_message.Message):
    __slots__ = ("name", "rows_done", "rows_total")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows_done: int
    rows_total: int
    def __init__(self, name: _Optional[str] = ..., rows_done: _Optional[int] = ..., rows_total: _Optional[int] = ...) -> None: ...

class KnnRecall(_message.Message):
    __slots__ = ("site", "detector", "queries", "k", "recall")
    SITE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    site: str
    detector: str
    queries: int
    k: int
    recall: float
    def __init__(self, site: _Optional[str] = ..., detector: _Optional[str] = ..., queries: _Optional[int] = ..., k: _Optional[int] = ..., recall: _Optional[float] = ...) -> None: ...

class FitReport(_message.Message):
    __slots__ = ("fit_version", "reference_rows", "calibration_computations", "calibration_fpr", "fit_seconds", "calibration_seconds", "knn_recall", "incremental", "rows_folded", "joint", "length_strata", "probes", "ingests", "reference_check")
    FIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FPR_FIELD_NUMBER: _ClassVar[int]
    FIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KNN_RECALL_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FOLDED_FIELD_NUMBER: _ClassVar[int]
    JOINT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_STRATA_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    INGESTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CHECK_FIELD_NUMBER: _ClassVar[int]
    fit_version: int
    reference_rows: int
    calibration_computations: int
    calibration_fpr: float
    fit_seconds: float
    calibration_seconds: float
    knn_recall: _containers.RepeatedCompositeFieldContainer[KnnRecall]
    incremental: bool
    rows_folded: int
    joint: JointFit
    length_strata: _containers.RepeatedCompositeFieldContainer[LengthStratum]
    probes: _containers.RepeatedCompositeFieldContainer[ProbeFit]
    ingests: _containers.RepeatedScalarFieldContainer[int]
    reference_check: ReferenceCheck
    def __init__(self, fit_version: _Optional[int] = ..., reference_rows: _Optional[int] = ..., calibration_computations: _Optional[int] = ..., calibration_fpr: _Optional[float] = ..., fit_seconds: _Optional[float] = ..., calibration_seconds: _Optional[float] = ..., knn_recall: _Optional[_Iterable[_Union[KnnRecall, _Mapping]]] = ..., incremental: _Optional[bool] = ..., rows_folded: _Optional[int] = ..., joint: _Optional[_Union[JointFit, _Mapping]] = ..., length_strata: _Optional[_Iterable[_Union[LengthStratum, _Mapping]]] = ..., probes: _Optional[_Iterable[_Union[ProbeFit, _Mapping]]] = ..., ingests: _Optional[_Iterable[int]] = ..., reference_check: _Optional[_Union[ReferenceCheck, _Mapping]] = ...) -> None: ...

class ReferenceCheck(_message.Message):
    __slots__ = ("skipped", "alpha", "ingests", "seconds")
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    INGESTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    skipped: str
    alpha: float
    ingests: _containers.RepeatedCompositeFieldContainer[IngestCheck]
    seconds: float
    def __init__(self, skipped: _Optional[str] = ..., alpha: _Optional[float] = ..., ingests: _Optional[_Iterable[_Union[IngestCheck, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class IngestCheck(_message.Message):
    __slots__ = ("first_ingest", "last_ingest", "principals", "rows", "computations", "site", "flagged_share", "p_value", "suspect")
    FIRST_INGEST_FIELD_NUMBER: _ClassVar[int]
    LAST_INGEST_FIELD_NUMBER: _ClassVar[int]
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_SHARE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    first_ingest: int
    last_ingest: int
    principals: _containers.RepeatedScalarFieldContainer[str]
    rows: int
    computations: int
    site: str
    flagged_share: float
    p_value: float
    suspect: bool
    def __init__(self, first_ingest: _Optional[int] = ..., last_ingest: _Optional[int] = ..., principals: _Optional[_Iterable[str]] = ..., rows: _Optional[int] = ..., computations: _Optional[int] = ..., site: _Optional[str] = ..., flagged_share: _Optional[float] = ..., p_value: _Optional[float] = ..., suspect: _Optional[bool] = ...) -> None: ...

class ProbeFit(_message.Message):
    __slots__ = ("name", "kind", "sites", "calibration_reference", "calibration_negatives", "calibration_fpr", "negatives_fpr", "heldout_positives", "recall", "deferred_benign", "deferred_positives")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FPR_FIELD_NUMBER: _ClassVar[int]
    NEGATIVES_FPR_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_BENIGN_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    sites: _containers.RepeatedCompositeFieldContainer[ProbeSiteFit]
    calibration_reference: int
    calibration_negatives: int
    calibration_fpr: float
    negatives_fpr: float
    heldout_positives: int
    recall: float
    deferred_benign: float
    deferred_positives: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., sites: _Optional[_Iterable[_Union[ProbeSiteFit, _Mapping]]] = ..., calibration_reference: _Optional[int] = ..., calibration_negatives: _Optional[int] = ..., calibration_fpr: _Optional[float] = ..., negatives_fpr: _Optional[float] = ..., heldout_positives: _Optional[int] = ..., recall: _Optional[float] = ..., deferred_benign: _Optional[float] = ..., deferred_positives: _Optional[float] = ...) -> None: ...

class ProbeSiteFit(_message.Message):
    __slots__ = ("site", "positive", "negative", "reference", "c")
    SITE_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    site: str
    positive: int
    negative: int
    reference: int
    c: float
    def __init__(self, site: _Optional[str] = ..., positive: _Optional[int] = ..., negative: _Optional[int] = ..., reference: _Optional[int] = ..., c: _Optional[float] = ...) -> None: ...

class LengthStratum(_message.Message):
    __slots__ = ("max_length", "computations", "threshold")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    max_length: int
    computations: int
    threshold: float
    def __init__(self, max_length: _Optional[int] = ..., computations: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class JointFit(_message.Message):
    __slots__ = ("sites", "width", "fit_rows", "calibration_rows", "incomplete", "skipped", "site_widths")
    SITES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FIT_ROWS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ROWS_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SITE_WIDTHS_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedScalarFieldContainer[str]
    width: int
    fit_rows: int
    calibration_rows: int
    incomplete: int
    skipped: str
    site_widths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sites: _Optional[_Iterable[str]] = ..., width: _Optional[int] = ..., fit_rows: _Optional[int] = ..., calibration_rows: _Optional[int] = ..., incomplete: _Optional[int] = ..., skipped: _Optional[str] = ..., site_widths: _Optional[_Iterable[int]] = ...) -> None: ...

class DetectorScore(_message.Message):
    __slots__ = ("detector", "raw", "p_value")
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    detector: str
    raw: float
    p_value: float
    def __init__(self, detector: _Optional[str] = ..., raw: _Optional[float] = ..., p_value: _Optional[float] = ...) -> None: ...

class TraceScore(_message.Message):
    __slots__ = ("trace_id", "site", "position", "score", "p_value", "flagged", "detectors")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    site: str
    position: int
    score: float
    p_value: float
    flagged: bool
    detectors: _containers.RepeatedCompositeFieldContainer[DetectorScore]
    def __init__(self, trace_id: _Optional[str] = ..., site: _Optional[str] = ..., position: _Optional[int] = ..., score: _Optional[float] = ..., p_value: _Optional[float] = ..., flagged: _Optional[bool] = ..., detectors: _Optional[_Iterable[_Union[DetectorScore, _Mapping]]] = ...) -> None: ...

class SlotPValue(_message.Message):
    __slots__ = ("site", "detector", "p_value")
    SITE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    site: str
    detector: str
    p_value: float
    def __init__(self, site: _Optional[str] = ..., detector: _Optional[str] = ..., p_value: _Optional[float] = ...) -> None: ...

class ComputationScore(_message.Message):
    __slots__ = ("monitor", "trace_id", "score", "p_value", "flagged", "traces", "slots", "scored_at_unix_ms", "fit_version", "partial", "flagged_at", "probes")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    TRACES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SCORED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_AT_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    trace_id: str
    score: float
    p_value: float
    flagged: bool
    traces: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotPValue]
    scored_at_unix_ms: int
    fit_version: int
    partial: bool
    flagged_at: int
    probes: _containers.RepeatedCompositeFieldContainer[ProbeScore]
    def __init__(self, monitor: _Optional[str] = ..., trace_id: _Optional[str] = ..., score: _Optional[float] = ..., p_value: _Optional[float] = ..., flagged: _Optional[bool] = ..., traces: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotPValue, _Mapping]]] = ..., scored_at_unix_ms: _Optional[int] = ..., fit_version: _Optional[int] = ..., partial: _Optional[bool] = ..., flagged_at: _Optional[int] = ..., probes: _Optional[_Iterable[_Union[ProbeScore, _Mapping]]] = ...) -> None: ...

class ProbeScore(_message.Message):
    __slots__ = ("name", "score", "p_value", "flagged", "verdict", "flagged_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    p_value: float
    flagged: bool
    verdict: str
    flagged_at: int
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ..., p_value: _Optional[float] = ..., flagged: _Optional[bool] = ..., verdict: _Optional[str] = ..., flagged_at: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("monitor", "batches", "complete")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    batches: _containers.RepeatedCompositeFieldContainer[TraceBatch]
    complete: bool
    def __init__(self, monitor: _Optional[str] = ..., batches: _Optional[_Iterable[_Union[TraceBatch, _Mapping]]] = ..., complete: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("traces", "computations", "provenance_warnings")
    TRACES_FIELD_NUMBER: _ClassVar[int]
    COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_WARNINGS_FIELD_NUMBER: _ClassVar[int]
    traces: _containers.RepeatedCompositeFieldContainer[TraceScore]
    computations: _containers.RepeatedCompositeFieldContainer[ComputationScore]
    provenance_warnings: _containers.RepeatedCompositeFieldContainer[ProvenanceWarning]
    def __init__(self, traces: _Optional[_Iterable[_Union[TraceScore, _Mapping]]] = ..., computations: _Optional[_Iterable[_Union[ComputationScore, _Mapping]]] = ..., provenance_warnings: _Optional[_Iterable[_Union[ProvenanceWarning, _Mapping]]] = ...) -> None: ...

class StreamScoresRequest(_message.Message):
    __slots__ = ("monitor", "batch", "complete")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    batch: TraceBatch
    complete: CompleteComputations
    def __init__(self, monitor: _Optional[str] = ..., batch: _Optional[_Union[TraceBatch, _Mapping]] = ..., complete: _Optional[_Union[CompleteComputations, _Mapping]] = ...) -> None: ...

class CompleteComputations(_message.Message):
    __slots__ = ("trace_ids",)
    TRACE_IDS_FIELD_NUMBER: _ClassVar[int]
    trace_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, trace_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TraceScores(_message.Message):
    __slots__ = ("traces", "early_flags", "provenance_warnings")
    TRACES_FIELD_NUMBER: _ClassVar[int]
    EARLY_FLAGS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_WARNINGS_FIELD_NUMBER: _ClassVar[int]
    traces: _containers.RepeatedCompositeFieldContainer[TraceScore]
    early_flags: _containers.RepeatedCompositeFieldContainer[ComputationScore]
    provenance_warnings: _containers.RepeatedCompositeFieldContainer[ProvenanceWarning]
    def __init__(self, traces: _Optional[_Iterable[_Union[TraceScore, _Mapping]]] = ..., early_flags: _Optional[_Iterable[_Union[ComputationScore, _Mapping]]] = ..., provenance_warnings: _Optional[_Iterable[_Union[ProvenanceWarning, _Mapping]]] = ...) -> None: ...

class StreamScoresResponse(_message.Message):
    __slots__ = ("traces", "computation")
    TRACES_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_FIELD_NUMBER: _ClassVar[int]
    traces: TraceScores
    computation: ComputationScore
    def __init__(self, traces: _Optional[_Union[TraceScores, _Mapping]] = ..., computation: _Optional[_Union[ComputationScore, _Mapping]] = ...) -> None: ...

class WatchFlagsRequest(_message.Message):
    __slots__ = ("monitors", "max_p_value")
    MONITORS_FIELD_NUMBER: _ClassVar[int]
    MAX_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    monitors: _containers.RepeatedScalarFieldContainer[str]
    max_p_value: float
    def __init__(self, monitors: _Optional[_Iterable[str]] = ..., max_p_value: _Optional[float] = ...) -> None: ...

class FlagEvent(_message.Message):
    __slots__ = ("computation", "raised_by")
    COMPUTATION_FIELD_NUMBER: _ClassVar[int]
    RAISED_BY_FIELD_NUMBER: _ClassVar[int]
    computation: ComputationScore
    raised_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, computation: _Optional[_Union[ComputationScore, _Mapping]] = ..., raised_by: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryScoresRequest(_message.Message):
    __slots__ = ("monitor", "trace_ids", "since_unix_ms", "until_unix_ms", "flagged_only", "limit", "flagged_by")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    TRACE_IDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_BY_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    trace_ids: _containers.RepeatedScalarFieldContainer[str]
    since_unix_ms: int
    until_unix_ms: int
    flagged_only: bool
    limit: int
    flagged_by: str
    def __init__(self, monitor: _Optional[str] = ..., trace_ids: _Optional[_Iterable[str]] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ..., flagged_only: _Optional[bool] = ..., limit: _Optional[int] = ..., flagged_by: _Optional[str] = ...) -> None: ...

class QueryScoresResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ComputationScore]
    def __init__(self, results: _Optional[_Iterable[_Union[ComputationScore, _Mapping]]] = ...) -> None: ...
