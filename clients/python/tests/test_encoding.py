"""Offline tests: activations to wire tensors, batch splitting, pooling. No server needed."""

import sys

import numpy as np
import pytest

from actwatch_client import Batch, Provenance
from actwatch_client._proto.actwatch.v1 import actwatch_pb2 as pb
from actwatch_client.tensors import (
    as_batches,
    coerce_batch,
    row_labels,
    split_batch,
    split_labels,
    to_tensor,
    to_trace_batch,
    with_provenance,
)


def test_float32_bytes_are_little_endian_row_major():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = to_tensor(a)
    assert t.dtype == pb.DTYPE_F32 and list(t.shape) == [2, 3]
    assert t.data == a.astype("<f4").tobytes(order="C")


def test_float16_sent_as_is():
    a = np.linspace(-1, 1, 8, dtype=np.float16).reshape(2, 4)
    t = to_tensor(a)
    assert t.dtype == pb.DTYPE_F16 and len(t.data) == 16
    assert np.array_equal(np.frombuffer(t.data, dtype="<f2").reshape(2, 4), a)


def test_big_endian_and_non_contiguous_are_normalised():
    a = np.arange(12, dtype=">f4").reshape(3, 4)
    t = to_tensor(a)
    assert np.array_equal(np.frombuffer(t.data, dtype="<f4").reshape(3, 4), a)
    b = np.arange(12, dtype=np.float32).reshape(4, 3).T  # Fortran order
    t = to_tensor(b)
    assert np.array_equal(np.frombuffer(t.data, dtype="<f4").reshape(3, 4), b)


def test_float64_is_cast_to_float32_and_bad_input_rejected():
    t = to_tensor(np.ones((1, 2)))
    assert t.dtype == pb.DTYPE_F32 and len(t.data) == 8
    with pytest.raises(ValueError, match="2-D"):
        to_tensor(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="one per row"):
        to_trace_batch("s", np.ones((2, 3), dtype=np.float32), ["a"])
    with pytest.raises(ValueError, match="positions"):
        to_trace_batch("s", np.ones((2, 3), dtype=np.float32), ["a", "b"], [0])


def test_trace_ids_and_positions():
    b = to_trace_batch(6, np.ones((2, 3), dtype=np.float32), np.array([10, 11]), np.array([0, 5]))
    assert b.site == "6" and list(b.trace_ids) == ["10", "11"] and list(b.positions) == [0, 5]


def test_split_batch_keeps_rows_ids_and_positions():
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    b = to_trace_batch("x", a, [f"id{i}" for i in range(10)], list(range(10)))
    parts = split_batch(b, max_bytes=3 * 16)
    assert [p.activations.shape[0] for p in parts] == [3, 3, 3, 1]
    joined = b"".join(p.activations.data for p in parts)
    assert joined == b.activations.data
    assert [t for p in parts for t in p.trace_ids] == list(b.trace_ids)
    assert [q for p in parts for q in p.positions] == list(b.positions)
    assert split_batch(b, 0) == [b]


def test_single_tuple_is_one_batch():
    one = ("s", np.ones((1, 2), dtype=np.float32), ["a"])
    assert as_batches(one) == [one]
    assert as_batches([one, one]) == [one, one]


def test_provenance_fields_and_validation():
    p = Provenance(model="m", dtype="")
    assert p == Provenance(model="m") and p.dtype is None, '"" declares nothing, like None'
    assert p.declared() == {"model": "m"} and Provenance().declared() == {}
    with pytest.raises(TypeError, match="model"):
        Provenance(model=3)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        p.model = "x"  # type: ignore[misc]


def test_to_trace_batch_declares_provenance_and_split_keeps_it():
    a = np.zeros((4, 2), dtype=np.float32)
    bare = to_trace_batch("s", a, list("abcd"))
    assert not bare.HasField("provenance")
    assert not to_trace_batch("s", a, list("abcd"), provenance=Provenance()).HasField("provenance")
    b = to_trace_batch("s", a, list("abcd"), provenance=Provenance(model="m", pooling="mean"))
    assert b.provenance == pb.Provenance(model="m", pooling="mean")
    parts = split_batch(b, max_bytes=8)
    assert len(parts) == 4 and all(part.provenance == b.provenance for part in parts)
    assert not any(part.HasField("provenance") for part in split_batch(bare, max_bytes=8))
    with pytest.raises(TypeError, match="Provenance"):
        to_trace_batch("s", a, list("abcd"), provenance={"model": "m"})  # type: ignore[arg-type]


def test_batch_provenance_wins_over_the_calls():
    a = np.zeros((1, 2), dtype=np.float32)
    call = Provenance(model="call", dtype="float32")
    own = Provenance(model="own", capture="c")
    want = pb.Provenance(model="own", capture="c", dtype="float32")
    assert coerce_batch(("s", a, ["x"], None, own), provenance=call).provenance == want
    assert coerce_batch(Batch("s", a, ["x"], provenance=own), provenance=call).provenance == want
    as_dict = {"site": "s", "activations": a, "trace_ids": ["x"], "provenance": own}
    assert coerce_batch(as_dict, provenance=call).provenance == want
    assert coerce_batch(("s", a, ["x"]), provenance=call).provenance == call._to_pb()
    assert coerce_batch(Batch("s", a, ["x"], provenance=own)).provenance == own._to_pb()
    # An encoded TraceBatch: merged into a copy, the caller's message untouched.
    tb = to_trace_batch("s", a, ["x"], provenance=own)
    merged = coerce_batch(tb, provenance=call)
    assert merged.provenance == want and merged is not tb
    assert tb.provenance == own._to_pb()
    assert with_provenance(tb, None) is tb and with_provenance(tb, Provenance(model="other")) is tb
    # A single Batch (five fields) is one batch.
    one = Batch("s", a, ["x"], provenance=own)
    assert as_batches(one) == [one]


def test_row_labels_forms_and_checks():
    ids = ["a", "b", "c"]
    assert row_labels(None, ids) is None  # reference traffic
    assert row_labels(True, ids) == [True] and row_labels(np.bool_(False), ids) == [False]
    assert row_labels([True, False, True], ids) == [True, False, True]
    assert row_labels(np.array([False, True, True]), ids) == [False, True, True]
    assert row_labels({"c": True, "a": False, "b": True, "z": True}, ids) == [False, True, True]
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        row_labels([True, False], ids)
    with pytest.raises(ValueError, match="'c'"):
        row_labels({"a": True, "b": True}, ids)
    with pytest.raises(ValueError, match="0 labels for 3 rows"):
        row_labels([], ids)  # never an empty list on the wire: that would be reference traffic
    for bad in ([1, 0, 1], np.array([0.9, 0.1, 0.5]), 1, "yes"):
        with pytest.raises(TypeError, match="bools"):
            row_labels(bad, ids)


def test_split_labels_follow_the_rows():
    batch = to_trace_batch("s", np.zeros((5, 4), np.float32), list("abcde"))
    parts = split_batch(batch, max_bytes=2 * 16)
    assert [len(p.trace_ids) for p in parts] == [2, 2, 1]
    per_row = [True, False, True, True, False]
    assert split_labels(per_row, parts) == [[True, False], [True, True], [False]]
    assert split_labels([True], parts) == [[True], [True], [True]]
    assert split_labels(None, parts) == [[], [], []]


def test_package_imports_without_torch():
    import subprocess

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'): raise ImportError('no torch')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import actwatch_client, actwatch_client.hooks\n"
        "import numpy as np\n"
        "actwatch_client.to_tensor(np.ones((1, 2), dtype=np.float32))\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_provenance_of_hugging_face_named_and_plain_models():
    from actwatch_client.hooks import model_provenance

    class Config:
        _name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
        _commit_hash = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"

    class HuggingFace:
        config = Config()

    class Named:
        name_or_path = "org/named"

    class Plain:
        pass

    assert model_provenance(HuggingFace()) == Provenance(model=Config._name_or_path, revision=Config._commit_hash)
    assert model_provenance(Named()) == Provenance(model="org/named")
    assert model_provenance(Plain()) == Provenance(model=f"{__name__}.{Plain.__qualname__}")
    # A config built locally (empty name, no commit hash) falls back to the class.
    HuggingFace.config = type("Local", (), {"_name_or_path": "", "_commit_hash": None})()
    assert model_provenance(HuggingFace()) == Provenance(model=f"{__name__}.{HuggingFace.__qualname__}")


# The tests below take the `torch` fixture (tests/conftest.py): marked `torch`, skipped without it.


def test_hook_refuses_automatic_provenance_the_server_would_refuse(torch):
    from actwatch_client import Client
    from actwatch_client.hooks import ActivationMonitorHook

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.name_or_path = "/very/long/path/" + "x" * 300
    with Client("127.0.0.1:9") as client:  # never connected: no call is made
        with pytest.raises(ValueError, match=r"provenance=Provenance\(model="):
            ActivationMonitorHook(model, ["0"], client, "m")
        hook = ActivationMonitorHook(model, ["0"], client, "m", provenance=Provenance(model="org/short"))
        hook.remove()


def test_torch_bf16_sent_as_bf16_bits(torch):
    t = torch.randn(3, 5).to(torch.bfloat16)
    w = to_tensor(t)
    assert w.dtype == pb.DTYPE_BF16 and list(w.shape) == [3, 5] and len(w.data) == 30
    assert w.data == t.contiguous().view(torch.int16).numpy().tobytes()
    # The bits are the top half of the f32 bits of the same (bf16-representable) values.
    f32_bits = np.frombuffer(t.to(torch.float32).numpy().tobytes(), dtype="<u4")
    assert np.array_equal(np.frombuffer(w.data, dtype="<u2"), (f32_bits >> 16).astype(np.uint16))


def test_torch_f16_f32_and_transposed(torch):
    t = torch.randn(4, 3)
    assert to_tensor(t.half()).dtype == pb.DTYPE_F16
    w = to_tensor(t.T)
    assert list(w.shape) == [3, 4]
    assert np.array_equal(np.frombuffer(w.data, dtype="<f4").reshape(3, 4), t.T.numpy())


def test_mean_pool_respects_mask_and_dtype(torch):
    from actwatch_client.hooks import pool_hidden

    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows, idx = pool_hidden(h, mask, pool="mean")
    assert idx is None
    assert torch.equal(rows, torch.stack([h[0, :2].mean(0), h[1, 0]]))
    rows, _ = pool_hidden(h.to(torch.bfloat16), mask, pool="mean")
    assert rows.dtype == torch.bfloat16

    rows, (b, pos) = pool_hidden(h, mask, pool="none")
    assert b.tolist() == [0, 0, 1] and pos.tolist() == [0, 1, 0]
    assert torch.equal(rows, torch.stack([h[0, 0], h[0, 1], h[1, 0]]))
