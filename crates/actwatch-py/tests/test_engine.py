"""The engine in-process against the real `actwatch` binary on the real MiniLM activations.

Claims checked: scores from the bindings equal `actwatch score`'s to the bit at both levels; a fit
merged from 4 parts equals `actwatch fit` over the same 4 files (identical model blobs); the
statistics of a part do not depend on how it is batched; bad input is an `ActwatchError` with the
engine's message; threads score concurrently (the GIL is released).
"""

from __future__ import annotations

import threading
from pathlib import Path

import actwatch_engine as ae
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from support import COLUMNS, FIT_FILES, cli_fit, cli_score, data, monitor_keys


@pytest.mark.parametrize("level", ["computation", "trace"])
def test_scores_equal_the_binarys(cli_monitor: Path, tmp_path: Path, level: str) -> None:
    monitor = ae.Monitor.load(str(cli_monitor))
    assert monitor.sites == ["2", "4", "6"]
    assert monitor.columns == ("id", "layer", "activation")
    for name in ["dev_id", "dev_ood_code"]:
        want = cli_score(cli_monitor, name, tmp_path, level)
        table = pq.read_table(data(name))
        got = pa.Table.from_batches([monitor.score(table, level=level)])
        assert got.equals(want), f"{name} at {level} level differs from actwatch score"
        # The same from a RecordBatchReader streaming small batches, and from one RecordBatch.
        reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=97))
        assert pa.Table.from_batches([monitor.score(reader, level=level)]).equals(want)
        one = table.combine_chunks().to_batches()[0]
        assert pa.Table.from_batches([monitor.score(one, level=level)]).equals(want)
    assert (want.column("p_value").to_numpy() > 0).all()
    # A batch without traces of the monitor's sites (here: none at all) scores to no rows: a map
    # over batches never fails on one. At trace level it has the schema a full batch has; at
    # computation level the other input columns, carried per computation, are absent.
    empty = monitor.score(table.slice(0, 0), level=level)
    assert empty.num_rows == 0
    if level == "trace":
        assert empty.schema == want.schema
    else:
        assert set(empty.schema.names) < set(want.schema.names)


def test_a_fit_in_four_parts_equals_the_binarys_fit(tmp_path: Path) -> None:
    cli = cli_fit(tmp_path / "cli", FIT_FILES)
    parts = [data(n) for n in FIT_FILES]
    monitor = ae.fit_parts(parts, pq.read_table, files=parts, **COLUMNS)
    monitor.save(str(tmp_path / "parts"))
    assert monitor_keys(tmp_path / "parts") == monitor_keys(cli), "the fit in parts is another model"
    # Same scores, through a reload of what the fit in parts saved.
    reloaded = ae.Monitor.load(str(tmp_path / "parts"))
    table = pq.read_table(data("dev_ood_base64"))
    assert reloaded.score(table).equals(ae.Monitor.load(str(cli)).score(table))


def test_fit_states_do_not_depend_on_batching_and_merge_in_order(tmp_path: Path) -> None:
    table = pq.read_table(data("train"))
    whole = ae.FitState(**COLUMNS)
    whole.fold(table)
    cut = ae.FitState(**COLUMNS)
    for batch in table.to_batches(max_chunksize=333):
        cut.fold(batch)
    assert cut.to_bytes() == whole.to_bytes()
    assert whole.rows == table.num_rows
    assert 0 < whole.fit_traces < table.num_rows
    # States travel as checked bytes: a flipped byte is refused.
    b = bytearray(whole.to_bytes())
    b[len(b) // 2] ^= 1
    with pytest.raises(ae.ActwatchError, match="checksum"):
        ae.FitState.from_bytes(bytes(b))
    other = ae.FitState(detectors="gaussian", **COLUMNS)
    with pytest.raises(ae.ActwatchError, match="different options"):
        other.merge(whole)


def test_bad_input_is_an_error_with_the_engines_message(cli_monitor: Path) -> None:
    monitor = ae.Monitor.load(str(cli_monitor))
    table = pq.read_table(data("dev_id"))
    with pytest.raises(ae.ActwatchError, match="activation"):
        monitor.score(table.drop_columns(["activation"]))
    vectors = table.column("activation").combine_chunks()
    values = pc.multiply(vectors.flatten(), pa.scalar(float("nan"), pa.float32()))
    nan = table.set_column(
        table.schema.get_field_index("activation"),
        "activation",
        pa.FixedSizeListArray.from_arrays(values, 384),
    )
    with pytest.raises(ae.ActwatchError, match=r"(?i)non-finite|nan"):
        monitor.score(nan)
    with pytest.raises(ae.ActwatchError, match="level"):
        monitor.score(table, level="token")
    with pytest.raises(ae.ActwatchError):
        ae.Monitor.load(str(cli_monitor / "missing"))
    with pytest.raises(ae.ActwatchError, match="detector"):
        ae.FitState(detectors="nope")


def test_threads_score_concurrently(cli_monitor: Path) -> None:
    monitor = ae.Monitor.load(str(cli_monitor))
    table = pq.read_table(data("dev_ood_code"))
    want = monitor.score(table)
    results: list[pa.RecordBatch] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(monitor.score(table))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r.equals(want) for r in results) and len(results) == 4


def test_traces_from_numpy_score_like_the_table(cli_monitor: Path) -> None:
    """`traces(ids, sites, vectors)` wraps numpy arrays: scoring them equals scoring the file."""
    import numpy as np

    monitor = ae.Monitor.load(str(cli_monitor))
    table = pq.read_table(data("dev_ood_code"))
    vectors = table.column("activation").combine_chunks()
    x = vectors.flatten().to_numpy().reshape(len(vectors), -1)
    batch = ae.traces(
        table.column("id").to_pylist(),
        table.column("layer").to_pylist(),
        x,
        trace_column="id",
        site_column="layer",
    )
    want = monitor.score(table.select(["id", "layer", "activation"]))
    assert monitor.score(batch).equals(want)
    # float64 is decoded by the engine (to the same f32 values here), one site for all rows.
    rows = table.filter(pc.equal(table.column("layer"), 2))
    x2 = rows.column("activation").combine_chunks().flatten().to_numpy().reshape(rows.num_rows, -1)
    sites = rows.column("layer").to_pylist()
    a = monitor.score(ae.traces(rows.column("id").to_pylist(), sites, x2, trace_column="id", site_column="layer"))
    b = monitor.score(
        ae.traces(rows.column("id").to_pylist(), sites, x2.astype(np.float64), trace_column="id", site_column="layer")
    )
    assert a.equals(b) and a.num_rows == rows.num_rows
    one_site = monitor.score(ae.traces(rows.column("id").to_pylist(), "2", x2, trace_column="id", site_column="layer"))
    assert one_site.column("p_value").equals(a.column("p_value"))
    with pytest.raises(ValueError, match="2-D"):
        ae.traces(["a"], "s", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="ids"):
        ae.traces(["a"], "s", np.zeros((2, 3), np.float32))
