"""Offline checks of the client's API against the proto (no server): results map every field of their
message, the typed stub matches the service, and options are keyword-only."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

import actwatch_client
from actwatch_client import results
from actwatch_client._proto.actwatch.v1 import actwatch_pb2 as pb
from actwatch_client._proto.actwatch.v1 import actwatch_pb2_grpc as pb_grpc
from actwatch_client._rpc import ActivationMonitorStub
from actwatch_client._streams import FlagWatch, IngestSession, ScoreStream
from actwatch_client.client import Client
from actwatch_client.hooks import ActivationMonitorHook, pool_hidden
from actwatch_client.tensors import split_batch, to_tensor, to_trace_batch

# ------------------------------------------------------------------------ results <-> proto messages

#: Each result type and the message it is built from.
RESULT_MESSAGES: dict[type, type[Message]] = {
    results.Provenance: pb.Provenance,
    results.ProvenanceConflict: pb.ProvenanceWarning,
    results.MonitorSpec: pb.MonitorSpec,
    results.SiteInfo: pb.SiteInfo,
    results.KnnRecall: pb.KnnRecall,
    results.JointFit: pb.JointFit,
    results.LengthStratum: pb.LengthStratum,
    results.ProbeSiteFit: pb.ProbeSiteFit,
    results.ProbeFit: pb.ProbeFit,
    results.IngestCheck: pb.IngestCheck,
    results.ReferenceCheck: pb.ReferenceCheck,
    results.IngestInfo: pb.IngestInfo,
    results.FitReport: pb.FitReport,
    results.FitPhase: pb.Phase,
    results.MonitorInfo: pb.MonitorInfo,
    results.IngestSummary: pb.IngestReferenceSummary,
    results.DetectorScore: pb.DetectorScore,
    results.TraceScore: pb.TraceScore,
    results.SlotPValue: pb.SlotPValue,
    results.ProbeScore: pb.ProbeScore,
    results.ComputationScore: pb.ComputationScore,
    results.FlagEvent: pb.FlagEvent,
    results.ScoreResult: pb.ScoreResponse,
    results.TraceResults: pb.TraceScores,
}

#: (result type, proto field) -> (dataclass field, why): fields deliberately given another name.
#: None so far: every result field has its proto field's name.
RENAMED: dict[tuple[type, str], tuple[str, str]] = {}

#: (result type, proto field) -> why: proto fields deliberately left out of the result type.
#: None so far.
OMITTED: dict[tuple[type, str], str] = {}

#: (result type, message field) -> why: message fields whose own fields are fields of the result type
#: itself (flattened); unset, they are the defaults of their message.
FLATTENED: dict[tuple[type, str], str] = {
    (results.FlagEvent, "computation"): (
        "a FlagEvent is the flagged ComputationScore (a subclass of it) with raised_by added, so that "
        "watchers read event.trace_id, event.p_value, ... as before raised_by existed"
    ),
}

#: (result type, message field) -> why: message fields that, when unset, become the message's
#: defaults instead of None. Every other unset message field (and proto3 `optional`) becomes None.
DEFAULTED_WHEN_UNSET: dict[tuple[type, str], str] = {
    (results.MonitorInfo, "spec"): (
        "set for every healthy monitor (a damaged one, see `damaged`, gets the message defaults); "
        "MonitorInfo.spec is not Optional"
    ),
    (results.SiteInfo, "provenance"): (
        "a site whose reference batches declared nothing has an empty Provenance (every field None), "
        "not None: SiteInfo.provenance is not Optional"
    ),
}

#: (result type, string field) -> why: plain proto3 strings whose empty value becomes None.
EMPTY_AS_NONE: dict[tuple[type, str], str] = {
    (results.Provenance, name): '"" is an undeclared field on the wire; None in Provenance (which is also an input)'
    for name in results.PROVENANCE_FIELDS
}

RESULT_OF_MESSAGE = {m.DESCRIPTOR.full_name: cls for cls, m in RESULT_MESSAGES.items()}


def _dc_name(cls: type, proto_field: str) -> str:
    return RENAMED.get((cls, proto_field), (proto_field, ""))[0]


def _dc_names(cls: type, proto_field: str) -> set[str]:
    """The result fields a proto field maps to: its namesake, or a flattened message's fields."""
    if (cls, proto_field) in FLATTENED:
        sub = RESULT_MESSAGES[cls].DESCRIPTOR.fields_by_name[proto_field].message_type
        inner = RESULT_OF_MESSAGE[sub.full_name]
        assert issubclass(cls, inner), f"{cls.__name__} flattens {proto_field} but is no {inner.__name__}"
        return {f.name for f in dataclasses.fields(inner)}
    return {_dc_name(cls, proto_field)}


def test_every_result_type_is_listed():
    dataclass_names = {n for n in results.__all__ if dataclasses.is_dataclass(getattr(results, n))}
    assert dataclass_names == {cls.__name__ for cls in RESULT_MESSAGES}
    exported = {n for n in actwatch_client.__all__ if n in dataclass_names}
    assert exported == dataclass_names, "every result type is exported by the package"


def test_exceptions_name_real_fields():
    for (cls, proto_field), (dc_field, why) in RENAMED.items():
        assert proto_field in RESULT_MESSAGES[cls].DESCRIPTOR.fields_by_name, (cls, proto_field)
        assert dc_field in {f.name for f in dataclasses.fields(cls)}, (cls, dc_field)
        assert why, "say why the field is renamed"
    for (cls, proto_field), why in {**OMITTED, **FLATTENED, **DEFAULTED_WHEN_UNSET, **EMPTY_AS_NONE}.items():
        assert proto_field in RESULT_MESSAGES[cls].DESCRIPTOR.fields_by_name, (cls, proto_field)
        assert why, "say why the field is omitted"
    for cls, proto_field in EMPTY_AS_NONE:
        field = RESULT_MESSAGES[cls].DESCRIPTOR.fields_by_name[proto_field]
        assert field.cpp_type == FieldDescriptor.CPPTYPE_STRING and not field.has_presence, (cls, proto_field)


@pytest.mark.parametrize("cls", list(RESULT_MESSAGES), ids=lambda c: c.__name__)
def test_result_type_is_frozen_and_maps_every_proto_field(cls):
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be @dataclass(frozen=True)"
    proto_fields = [f.name for f in RESULT_MESSAGES[cls].DESCRIPTOR.fields]
    mapped = {n for f in proto_fields if (cls, f) not in OMITTED for n in _dc_names(cls, f)}
    dc_fields = {f.name for f in dataclasses.fields(cls)}
    missing = mapped - dc_fields
    assert not missing, f"proto fields of {RESULT_MESSAGES[cls].__name__} with no field in {cls.__name__}: {missing}"
    extra = dc_fields - mapped
    assert not extra, f"fields of {cls.__name__} that map to no proto field: {extra}"


@pytest.mark.parametrize("cls", list(RESULT_MESSAGES), ids=lambda c: c.__name__)
def test_from_pb_builds_by_keyword(cls):
    """``cls(...)`` in ``_from_pb`` passes every field by keyword, so proto order cannot matter."""
    source = textwrap.dedent(inspect.getsource(cls._from_pb.__func__))
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cls"
    ]
    assert len(calls) == 1, f"{cls.__name__}._from_pb must build the result with one cls(...) call"
    assert not calls[0].args, f"{cls.__name__}._from_pb passes fields by position"


_counter = itertools.count(1)


def _value(field: FieldDescriptor):
    """A value for ``field`` that no other field gets (bools are True: their default is False)."""
    n = next(_counter)
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return f"{field.name}-{n}"
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return True
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return n + 0.25
    if cpp in (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    ):
        return n
    raise AssertionError(f"no test value for {field.full_name} (type {field.type}): extend _value")


def _set(msg: Message, field: FieldDescriptor) -> None:
    """Sets ``field`` of ``msg`` to distinct values (two elements when repeated)."""
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        target = getattr(msg, field.name)
        for _ in range(2 if field.is_repeated else 1):
            sub = target.add() if field.is_repeated else target
            _fill(sub)
            if not field.is_repeated and not sub.ListFields():
                sub.SetInParent()
    elif field.is_repeated:
        getattr(msg, field.name).extend([_value(field), _value(field)])
    else:
        setattr(msg, field.name, _value(field))


def _fill(msg: Message) -> Message:
    for field in msg.DESCRIPTOR.fields:
        _set(msg, field)
    return msg


def _assert_matches(result, msg: Message, path: str, *, flattened_into: type | None = None) -> None:
    """Every field of ``msg`` is in ``result`` under its (mapped) name, with the same value.
    ``flattened_into``: ``msg`` is a flattened field of ``result``, a result of this type."""
    descriptor: Descriptor = msg.DESCRIPTOR
    cls = RESULT_OF_MESSAGE[descriptor.full_name]
    want_type = flattened_into or cls
    assert type(result) is want_type, f"{path}: {type(result).__name__}, expected {want_type.__name__}"
    for field in descriptor.fields:
        if (cls, field.name) in OMITTED:
            continue
        where = f"{path}.{field.name}"
        want = getattr(msg, field.name)
        if (cls, field.name) in FLATTENED:
            _assert_matches(result, want, where, flattened_into=cls)  # the default message when unset
            continue
        got = getattr(result, _dc_name(cls, field.name))
        if field.has_presence and not field.is_repeated and not msg.HasField(field.name):
            if (cls, field.name) in DEFAULTED_WHEN_UNSET:
                _assert_matches(got, want, where)  # the default message
            else:
                assert got is None, f"{where}: unset in the message, {got!r} in the result"
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and field.is_repeated:
            assert isinstance(got, list) and len(got) == len(want), where
            for i, (g, w) in enumerate(zip(got, want)):
                _assert_matches(g, w, f"{where}[{i}]")
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            _assert_matches(got, want, where)
        elif field.is_repeated:
            assert isinstance(got, list) and got == list(want), f"{where}: {got!r} != {list(want)!r}"
        elif (cls, field.name) in EMPTY_AS_NONE:
            assert got == (want or None), f"{where}: {got!r} for {want!r}"
        else:
            assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("cls", list(RESULT_MESSAGES), ids=lambda c: c.__name__)
def test_from_pb_maps_each_field_to_its_namesake(cls):
    message = RESULT_MESSAGES[cls]
    # All fields set (distinct values, nested messages filled), and none set.
    full = _fill(message())
    _assert_matches(cls._from_pb(full), full, cls.__name__)
    empty = message()
    _assert_matches(cls._from_pb(empty), empty, cls.__name__)
    # One field at a time: exactly its namesake changes (catches swapped fields of one type, bools too).
    base = cls._from_pb(empty)
    for field in message.DESCRIPTOR.fields:
        if (cls, field.name) in OMITTED:
            continue
        one = message()
        _set(one, field)
        got = cls._from_pb(one)
        changed = {f.name for f in dataclasses.fields(cls) if getattr(got, f.name) != getattr(base, f.name)}
        assert changed == _dc_names(cls, field.name), f"{cls.__name__}: setting {field.name} changed {changed}"
        _assert_matches(got, one, cls.__name__)


def test_provenance_round_trips_every_field():
    """Provenance is also an input: ``_to_pb`` writes every field of the message to its namesake."""
    full = _fill(pb.Provenance())
    assert results.Provenance._from_pb(full)._to_pb() == full
    for field in pb.Provenance.DESCRIPTOR.fields:
        one = pb.Provenance()
        _set(one, field)
        prov = results.Provenance._from_pb(one)
        assert prov._to_pb() == one
        assert prov.declared() == {field.name: getattr(one, field.name)}
    assert results.Provenance()._to_pb() == pb.Provenance()
    assert tuple(results.PROVENANCE_FIELDS) == tuple(f.name for f in pb.Provenance.DESCRIPTOR.fields)


# ------------------------------------------------------------------------------- the typed stub


def test_typed_stub_matches_the_service():
    service = pb.DESCRIPTOR.services_by_name["ActivationMonitor"]
    annotations = ActivationMonitorStub.__annotations__
    assert set(annotations) == {m.name for m in service.methods}
    kinds = {
        (False, False): "UnaryUnary",
        (False, True): "UnaryStream",
        (True, False): "StreamUnary",
        (True, True): "StreamStream",
    }
    for m in service.methods:
        kind = kinds[(m.client_streaming, m.server_streaming)]
        want = f"grpc.{kind}MultiCallable[pb.{m.input_type.name}, pb.{m.output_type.name}]"
        assert annotations[m.name] == want, m.name
        assert m.input_type.file is pb.DESCRIPTOR and m.output_type.file is pb.DESCRIPTOR

    channel = grpc.insecure_channel("127.0.0.1:9")  # never connected: no call is made
    try:
        generated = pb_grpc.ActivationMonitorStub(channel)
        for m in service.methods:
            kind = kinds[(m.client_streaming, m.server_streaming)]
            assert isinstance(getattr(generated, m.name), getattr(grpc, f"{kind}MultiCallable")), m.name
    finally:
        channel.close()


# ------------------------------------------------------------------------------ keyword-only options

#: Optional parameters that stay positional, and why. Every other optional parameter of a public
#: method or function must be keyword-only.
POSITIONAL_OPTIONAL = {
    ("Client.__init__", "address"): "what a client is for: Client(address)",
    ("Client.watch_flags", "monitors"): "what to watch, not an option: watch_flags([name])",
    ("IngestSession.send", "positions"): "per-row data, the 4th element of a batch tuple",
    ("ScoreStream.send", "positions"): "per-row data, the 4th element of a batch tuple",
    ("to_trace_batch", "positions"): "per-row data, the 4th element of a batch tuple",
    ("ActivationMonitorHook.set_batch", "attention_mask"): "per-batch data: set_batch(ids, mask)",
    ("ActivationMonitorHook.batch", "attention_mask"): "per-batch data: batch(ids, mask)",
    ("pool_hidden", "attention_mask"): "per-batch data, the hidden states' mask",
}

PUBLIC_CLASSES = [Client, IngestSession, ScoreStream, FlagWatch, ActivationMonitorHook]
PUBLIC_FUNCTIONS = [to_tensor, to_trace_batch, split_batch, pool_hidden]


def _public_callables():
    for cls in PUBLIC_CLASSES:
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_") or name == "__init__":
                yield f"{cls.__name__}.{name}", fn
    for cls in RESULT_MESSAGES:
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_"):
                yield f"{cls.__name__}.{name}", fn
    for fn in PUBLIC_FUNCTIONS:
        yield fn.__name__, fn


def test_optional_parameters_are_keyword_only():
    positional = set()
    for qualname, fn in _public_callables():
        for p in inspect.signature(fn).parameters.values():
            if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD:
                positional.add((qualname, p.name))
    unexpected = positional - set(POSITIONAL_OPTIONAL)
    assert not unexpected, f"optional parameters that should be keyword-only (after `*`): {sorted(unexpected)}"
    stale = set(POSITIONAL_OPTIONAL) - positional
    assert not stale, f"POSITIONAL_OPTIONAL lists parameters that are not (any more): {sorted(stale)}"
