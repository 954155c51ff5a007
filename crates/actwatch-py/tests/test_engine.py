"""The engine in-process against the real `actwatch` binary on the real MiniLM activations.

Claims checked: scores from the bindings equal `actwatch score`'s to the bit at both levels; a fit
merged from 4 parts equals `actwatch fit` over the same 4 files (identical model blobs); the
statistics of a part do not depend on how it is batched; bad input is an `ActwatchError` with the
engine's message; threads score concurrently (the GIL is released).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import actwatch_engine as ae

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data" / "minilm"
BIN = Path(os.environ.get("ACTWATCH_BIN", ROOT / "target" / "debug" / "actwatch"))
COLUMNS = ["--trace-column", "id", "--site-column", "layer", "--vector-column", "activation"]
OPTIONS = dict(trace_column="id", site_column="layer", vector_column="activation")
FOUR = ["train", "dev_ood_non_english", "dev_ood_code", "dev_id"]
# The manifest's model: options, sites (with their blobs' SHA-256), joint detector, calibration.
MODEL_KEYS = ["options", "sites", "joint", "calibration"]


def data(name: str) -> Path:
    return DATA / f"{name}.parquet"


def run(*args: object) -> None:
    assert BIN.exists(), f"the actwatch binary is missing at {BIN} (set ACTWATCH_BIN)"
    subprocess.run([str(BIN), *map(str, args)], check=True, capture_output=True)


def model(monitor_dir: Path) -> dict:
    manifest = json.loads((monitor_dir / "manifest.json").read_text())
    return {k: manifest[k] for k in MODEL_KEYS}


@pytest.fixture(scope="module")
def cli_monitor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "monitor"
    run("fit", "--input", data("train"), "--out", out, *COLUMNS)
    return out


@pytest.mark.parametrize("level", ["computation", "trace"])
def test_scores_equal_the_binarys(cli_monitor: Path, tmp_path: Path, level: str) -> None:
    monitor = ae.Monitor.load(str(cli_monitor))
    assert monitor.sites == ["2", "4", "6"]
    assert monitor.columns == ("id", "layer", "activation")
    for name in ["dev_id", "dev_ood_code"]:
        out = tmp_path / f"{name}-{level}.parquet"
        run("score", "--monitor", cli_monitor, "--input", data(name), "--output", out, "--level", level)
        want = pq.read_table(out)
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
    cli = tmp_path / "cli"
    run("fit", "--input", *[data(n) for n in FOUR], "--out", cli, *COLUMNS)
    parts = [str(data(n)) for n in FOUR]
    monitor = ae.fit_parts(parts, pq.read_table, files=parts, **OPTIONS)
    monitor.save(str(tmp_path / "parts"))
    assert model(tmp_path / "parts") == model(cli), "the fit in parts is another model"
    # Same scores, through a reload of what the fit in parts saved.
    reloaded = ae.Monitor.load(str(tmp_path / "parts"))
    table = pq.read_table(data("dev_ood_base64"))
    assert reloaded.score(table).equals(ae.Monitor.load(str(cli)).score(table))


def test_fit_states_do_not_depend_on_batching_and_merge_in_order(tmp_path: Path) -> None:
    table = pq.read_table(data("train"))
    whole = ae.FitState(**OPTIONS)
    whole.fold(table)
    cut = ae.FitState(**OPTIONS)
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
    other = ae.FitState(detectors="gaussian", **OPTIONS)
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
    with pytest.raises(ae.ActwatchError, match="(?i)non-finite|nan"):
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
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r.equals(want) for r in results) and len(results) == 4
