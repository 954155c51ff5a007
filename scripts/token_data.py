#!/usr/bin/env python3
"""Helpers of scripts/make_token_data.sh: per-token MiniLM data for the issue "Detection power".

Run with the torch venv's Python (scripts/setup_torch.sh: numpy, pyarrow, torch, tokenizers). Every
random choice comes from numpy's default_rng(seed).

    python scripts/token_data.py subset  --input IN --output OUT --n N [--max-tokens T] [--seed S]
    python scripts/token_data.py inject  --base dev_id_inputs.parquet --ood code=PATH ... \\
        --output spans_inputs.parquet --spans spans.parquet [--n N] [--seed S] [--min-len 4 --max-len 16]
    python scripts/token_data.py verify  --model minilm.pt --inputs IN --traces TRACES --site 4 [--spans SPANS]
    python scripts/token_data.py half    --input TRACES --output TRACES_F16
    python scripts/token_data.py summary FILE...

Inputs Parquet (what `actwatch capture` reads, as `scripts/export_minilm.py tokenize` writes it): id
(string), input_ids (list<int64>, [CLS] ... [SEP]), attention_mask (list<int64>, all ones).

Span injection (`inject`): for each base sequence (all of them, or a seeded sample of --n, kept in
input order) draw a span length L uniform in min-len..max-len, an OOD category uniform among the --ood
files, a text of that category with at least L content tokens (its ids without [CLS]/[SEP]), a start
uniform inside that text, and an insertion point q uniform in 1..n-1 (after [CLS] at index 0, before
[SEP] at index n-1); the injected sequence is ids[:q] + span + ids[q:]. `actwatch capture --pool none`
numbers a token by its index in input_ids ([CLS] = 0, [SEP] = last; `verify` checks this against the
model run from Python), so span_start = q. The spans sidecar: id, ood_category, span_start, span_len,
n_tokens (of the injected sequence, [CLS] and [SEP] included), base_id, ood_id, ood_offset (index of
the span's first token in the OOD text's input_ids).

With --control-output / --control-spans, `inject` also writes a paired in-distribution control: each
base sequence with a span of the same length at the same position, cut from another base sequence
(ids "idspan-<base id>", ood_category "id"), drawn from its own random stream (default_rng([seed, 1])),
so the OOD injections are the same with or without it. It separates what the OOD content is detected
by from what splicing and the added length alone do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def read_inputs(path: Path) -> dict[str, list]:
    t = pq.read_table(path, columns=["id", "input_ids"]).to_pydict()
    return {"id": [str(i) for i in t["id"]], "input_ids": t["input_ids"]}


def write_inputs(path: Path, ids: list[str], seqs: list[list[int]]) -> None:
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(seqs, pa.list_(pa.int64())),
            "attention_mask": pa.array([[1] * len(s) for s in seqs], pa.list_(pa.int64())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=256, compression="zstd")


def subset(args: argparse.Namespace) -> None:
    """A seeded sample of --n rows (of those with at most --max-tokens tokens), in input order."""
    t = read_inputs(args.input)
    n_tok = np.array([len(s) for s in t["input_ids"]])
    eligible = np.flatnonzero(n_tok <= args.max_tokens) if args.max_tokens else np.arange(len(n_tok))
    if len(eligible) < args.n:
        raise SystemExit(f"{args.input}: only {len(eligible)} rows with <= {args.max_tokens} tokens, {args.n} asked")
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(eligible, size=args.n, replace=False))
    write_inputs(args.output, [t["id"][i] for i in pick], [t["input_ids"][i] for i in pick])
    print(f"wrote {args.output}: {len(pick)} of {len(n_tok)} rows, {int(n_tok[pick].sum())} tokens")


def _write_spans(path: Path, rows: dict[str, list]) -> None:
    ints = ("span_start", "span_len", "n_tokens", "ood_offset")
    sidecar = pa.table({k: pa.array(v, pa.int32() if k in ints else pa.string()) for k, v in rows.items()})
    pq.write_table(sidecar, path, compression="zstd")


def inject(args: argparse.Namespace) -> None:
    base = read_inputs(args.base)
    cats: list[str] = []
    ood: dict[str, dict[str, list]] = {}
    for spec in args.ood:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--ood {spec!r}: expected CATEGORY=PATH")
        cats.append(name)
        ood[name] = read_inputs(Path(path))
    rng = np.random.default_rng(args.seed)
    # the control's own stream: adding or dropping the control leaves the OOD injections unchanged
    rng_control = np.random.default_rng([args.seed, 1])
    n_base = len(base["id"])
    n = n_base if args.n <= 0 or args.n >= n_base else args.n
    chosen = np.arange(n_base) if n == n_base else np.sort(rng.choice(n_base, size=n, replace=False))
    # Content token counts of each OOD text (without [CLS] and [SEP]).
    content = {c: np.array([len(s) - 2 for s in ood[c]["input_ids"]]) for c in cats}
    base_content = np.array([len(s) - 2 for s in base["input_ids"]])
    keys = ("id", "ood_category", "span_start", "span_len", "n_tokens", "base_id", "ood_id", "ood_offset")
    rows: dict[str, list] = {k: [] for k in keys}
    control: dict[str, list] = {k: [] for k in keys}
    seqs: list[list[int]] = []
    control_seqs: list[list[int]] = []
    for i in chosen:
        ids = base["input_ids"][i]
        length = int(rng.integers(args.min_len, args.max_len + 1))
        cat = cats[int(rng.integers(len(cats)))]
        long_enough = np.flatnonzero(content[cat] >= length)
        j = int(long_enough[rng.integers(len(long_enough))])
        src = ood[cat]["input_ids"][j]
        offset = 1 + int(rng.integers(content[cat][j] - length + 1))  # index in src, after [CLS]
        q = int(rng.integers(1, len(ids)))  # 1..n-1: after [CLS], before [SEP]
        seq = list(ids[:q]) + list(src[offset : offset + length]) + list(ids[q:])
        if len(seq) > args.max_tokens:
            raise SystemExit(f"{base['id'][i]}: {len(seq)} tokens after injection, more than {args.max_tokens}")
        seqs.append(seq)
        for key, value in zip(keys, (f"span-{base['id'][i]}", cat, q, length, len(seq), base["id"][i],
                                     ood[cat]["id"][j], offset)):
            rows[key].append(value)
        if args.control_output:
            # the paired control: the same base, position and length, the span cut from another
            # in-distribution sequence of the base file
            others = np.flatnonzero((base_content >= length) & (np.arange(n_base) != i))
            jc = int(others[rng_control.integers(len(others))])
            src = base["input_ids"][jc]
            off = 1 + int(rng_control.integers(base_content[jc] - length + 1))
            control_seqs.append(list(ids[:q]) + list(src[off : off + length]) + list(ids[q:]))
            for key, value in zip(keys, (f"idspan-{base['id'][i]}", "id", q, length, len(seq), base["id"][i],
                                         base["id"][jc], off)):
                control[key].append(value)
    write_inputs(args.output, rows["id"], seqs)
    _write_spans(args.spans, rows)
    counts = {c: rows["ood_category"].count(c) for c in cats}
    print(f"wrote {args.output} and {args.spans}: {len(seqs)} injected sequences "
          f"({sum(len(s) for s in seqs)} tokens; spans per category {counts}; seed {args.seed})")
    if args.control_output:
        write_inputs(args.control_output, control["id"], control_seqs)
        _write_spans(args.control_spans, control)
        print(f"wrote {args.control_output} and {args.control_spans}: the paired in-distribution control "
              f"(spans from other {args.base.name} sequences)")


def read_traces(path: Path, site: str) -> dict[str, np.ndarray]:
    t = pq.read_table(path, filters=[("site", "=", site)])
    act = t.column("activation").combine_chunks()
    d = act.type.list_size
    return {
        "id": np.asarray(t.column("trace_id").to_pylist()),
        "position": t.column("position").to_numpy(),
        "x": act.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d),
    }


def verify(args: argparse.Namespace) -> None:
    """Checks a per-token capture against its inputs: every input sequence has exactly one row per
    token with positions 0..n-1, and (re-running the TorchScript model from Python on the first
    --limit sequences) the row at position p is the model's hidden state at input_ids index p. With
    --spans, also that the sidecar's span_start / span_len / n_tokens agree with the inputs."""
    import torch

    inputs = read_inputs(args.inputs)
    tr = read_traces(args.traces, str(args.site))
    by_id: dict[str, np.ndarray] = {}
    order = np.lexsort((tr["position"], tr["id"]))
    ids_sorted = tr["id"][order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        by_id[str(ids_sorted[a])] = order[a:b]
    for i, seq in zip(inputs["id"], inputs["input_ids"]):
        rows = by_id.get(i)
        if rows is None or not np.array_equal(tr["position"][rows], np.arange(len(seq))):
            raise SystemExit(f"{args.traces}: positions of {i} are not 0..{len(seq) - 1}")
    if len(by_id) != len(inputs["id"]):
        raise SystemExit(f"{args.traces}: {len(by_id)} computations, {len(inputs['id'])} inputs")
    torch.set_grad_enabled(False)
    model = torch.jit.load(str(args.model)).eval()
    worst = 0.0
    for i, seq in list(zip(inputs["id"], inputs["input_ids"]))[: args.limit]:
        ids = torch.tensor([seq], dtype=torch.int64)
        h = model(ids, torch.ones_like(ids))[args.site][0].numpy()
        rows = by_id[i]
        worst = max(worst, float(np.abs(tr["x"][rows] - h[tr["position"][rows]]).max()))
    if worst > args.tolerance:
        raise SystemExit(f"{args.traces}: captured rows differ from the model by {worst:.3g}")
    msg = (f"verified {args.traces} (site {args.site}): {len(inputs['id'])} sequences, positions = "
           f"input_ids indices ([CLS] = 0); {min(args.limit, len(inputs['id']))} re-run from Python, "
           f"max abs difference {worst:.2g}")
    if args.spans:
        sp = pq.read_table(args.spans).to_pydict()
        seqs = dict(zip(inputs["id"], inputs["input_ids"]))
        for k, i in enumerate(sp["id"]):
            s, n_span, n = sp["span_start"][k], sp["span_len"][k], sp["n_tokens"][k]
            if len(seqs[i]) != n or not 1 <= s or s + n_span > n - 1:
                raise SystemExit(f"{args.spans}: row {k} ({i}) does not fit its sequence")
        msg += f"; {len(sp['id'])} spans inside their sequences"
    print(msg)


def half(args: argparse.Namespace) -> None:
    """The same traces with a FixedSizeList<float16> vector column (actwatch's reader takes it), stored
    byte-stream-split + zstd (7% smaller than plain for these vectors)."""
    t = pq.read_table(args.input)
    act = t.column("activation").combine_chunks()
    d = act.type.list_size
    values = act.values.to_numpy(zero_copy_only=False).astype(np.float16)
    f16 = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float16()), d)
    t = t.set_column(t.schema.get_field_index("activation"), "activation", f16)
    pq.write_table(t, args.output, compression="zstd", row_group_size=8192,
                   use_byte_stream_split=["activation.list.element"], use_dictionary=["trace_id", "site"])
    print(f"wrote {args.output}: {t.num_rows} rows, float16")


def summary(args: argparse.Namespace) -> None:
    for path in args.files:
        meta = pq.ParquetFile(path)
        names = meta.schema_arrow.names
        if "trace_id" in names:
            t = pq.read_table(path, columns=["trace_id", "site"])
            sites = sorted(set(t.column("site").to_pylist()), key=lambda s: int(s) if s.isdigit() else s)
            what = (f"{t.num_rows} rows, {len(set(t.column('trace_id').to_pylist()))} computations, "
                    f"sites {','.join(sites)}, {meta.schema_arrow.field('activation').type}")
        else:
            what = f"{meta.metadata.num_rows} rows ({', '.join(names)})"
        print(f"  {path}: {what}, {Path(path).stat().st_size:,} bytes")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("subset", help="seeded sample of an inputs Parquet")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--max-tokens", type=int, default=0, help="only rows with at most this many tokens (0: any)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("inject", help="span-injected sequences and their spans sidecar")
    p.add_argument("--base", type=Path, required=True, help="inputs Parquet of the in-distribution sequences")
    p.add_argument("--ood", action="append", required=True, help="CATEGORY=inputs Parquet (repeat)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--spans", type=Path, required=True)
    p.add_argument("--n", type=int, default=1000, help="seeded sample of N base sequences (<= 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--control-output", type=Path, help="also write the paired in-distribution control's inputs")
    p.add_argument("--control-spans", type=Path, help="... and its sidecar (ood_category = id)")
    p = sub.add_parser("verify", help="check a per-token capture against its inputs and the model")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--traces", type=Path, required=True)
    p.add_argument("--site", type=int, required=True)
    p.add_argument("--spans", type=Path)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p = sub.add_parser("half", help="cast a traces file's vectors to float16")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("summary", help="rows, computations, sites and bytes of Parquet files")
    p.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    {"subset": subset, "inject": inject, "verify": verify, "half": half, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
