#!/usr/bin/env python3
"""Join the JSON lines of the peer benchmark and of actwatch's bench example into one Markdown table.

    python scripts/bench_table.py PEERS.jsonl ACTWATCH.jsonl > table.md

Each input line is a JSON object with at least "task" and "tool" and either "per_s" (throughput)
or "seconds" (duration); "threads", "n", "recall_at_10" are used when present. Anything else
(blank lines, non-JSON lines, rows without a figure, rows whose task starts with "_") is skipped
or listed as environment notes. Either file may be missing or empty.

Pairing: within a task, each peer row is paired with the actwatch rows run with the same number
of threads; where actwatch has no row with that thread count, the peer row with the most threads
is paired with all actwatch rows of the task (marked "threads differ"). Rows without a partner
are still listed.

"speed actwatch/peer" is a speed ratio, > 1 means actwatch is faster:
per_s(actwatch) / per_s(peer) for throughput tasks, seconds(peer) / seconds(actwatch) otherwise.
"""
from __future__ import annotations

import json
import sys


def load(path: str | None) -> tuple[list[dict], list[dict], list[str]]:
    rows: list[dict] = []
    meta: list[dict] = []
    problems: list[str] = []
    if not path:
        return rows, meta, problems
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        problems.append(f"{path}: {e.strerror or e}")
        return rows, meta, problems
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}:{i}: not JSON, skipped")
            continue
        if not isinstance(r, dict) or not r.get("task"):
            continue
        task = str(r["task"])
        if task.startswith("_"):
            meta.append(r)
            continue
        if num(r.get("per_s")) is None and num(r.get("seconds")) is None:
            problems.append(f"{path}:{i}: task {task!r} has neither per_s nor seconds, skipped")
            continue
        r.setdefault("tool", "?")
        rows.append(r)
    if not rows and not problems:
        problems.append(f"{path}: no rows")
    return rows, meta, problems


def num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def threads(r: dict):
    t = r.get("threads")
    try:
        return int(t)
    except (TypeError, ValueError):
        return None


def figure(r: dict | None) -> str:
    if r is None:
        return "—"
    p = num(r.get("per_s"))
    if p is not None:
        if p >= 1e6:
            return f"{p / 1e6:.2f} M/s"
        if p >= 1e3:
            return f"{p / 1e3:.1f} k/s"
        return f"{p:.1f} /s"
    s = num(r.get("seconds"))
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def ratio(a: dict | None, p: dict | None) -> str:
    if a is None or p is None:
        return "—"
    ap, pp = num(a.get("per_s")), num(p.get("per_s"))
    if ap is not None and pp is not None and pp > 0:
        return f"{ap / pp:.2f}×"
    asec, psec = num(a.get("seconds")), num(p.get("seconds"))
    same_n = a.get("n") is None or p.get("n") is None or a.get("n") == p.get("n")
    if asec is not None and psec is not None and asec > 0 and same_n:
        return f"{psec / asec:.2f}×"
    return "n/a"


def cell(x) -> str:
    return "—" if x is None else str(x).replace("|", "\\|")


def notes(a: dict | None, p: dict | None, extra: list[str]) -> str:
    out = list(extra)
    for who, r in (("peer", p), ("actwatch", a)):
        if r is not None and num(r.get("recall_at_10")) is not None:
            out.append(f"{who} recall@10 {num(r['recall_at_10']):.3f}")
    if a is not None and p is not None:
        na, np_ = a.get("n"), p.get("n")
        if na is not None and np_ is not None and na != np_:
            out.append(f"n differs ({na} vs {np_})")
        if a.get("d") is not None and p.get("d") is not None and a["d"] != p["d"]:
            out.append(f"d differs ({a['d']} vs {p['d']})")
    return "; ".join(out)


def build(peers: list[dict], mine: list[dict]) -> list[list[str]]:
    tasks: list[str] = []
    for r in peers + mine:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    lines = []
    for task in tasks:
        P = [r for r in peers if r["task"] == task]
        A = [r for r in mine if r["task"] == task]
        used: set[int] = set()
        max_thr = max((threads(r) or 0 for r in P), default=0)
        for p in P:
            tp = threads(p)
            same = [i for i, a in enumerate(A)
                    if (threads(a) == tp or threads(a) is None or tp is None)
                    and (a.get("ef") is None or p.get("ef") is None or a.get("ef") == p.get("ef"))]
            extra: list[str] = []
            if not same and A and (tp or 0) == max_thr:
                same = list(range(len(A)))
                extra = ["threads differ"]
            if not same:
                lines.append(row(task, None, p, []))
            for i in same:
                used.add(i)
                lines.append(row(task, A[i], p, extra))
        for i, a in enumerate(A):
            if i not in used:
                lines.append(row(task, a, None, []))
    return lines


def row(task: str, a: dict | None, p: dict | None, extra: list[str]) -> list[str]:
    return [task,
            cell(a.get("tool") if a else None), cell(threads(a) if a else None), figure(a),
            cell(p.get("tool") if p else None), cell(threads(p) if p else None), figure(p),
            ratio(a, p), cell(notes(a, p, extra)) or ""]


RECALL_TARGET = 0.98


def peak_share(meta: list[dict], rows: list[dict]) -> list[str]:
    """Gaussian scoring as a share of the FP32 peak a large GEMM reached in the same run, per
    thread count, counting 2 d r flops per vector (the dense whitening product, r = d at full
    rank): a dense-equivalent rate. actwatch's full-rank product is triangular, about half of
    those flops, so its share can exceed what the hardware does."""
    peaks = {threads(m): m for m in meta if m.get("task") == "_peak" and num(m.get("gflops"))}
    out = []
    for r in rows:
        peak = peaks.get(threads(r))
        if not str(r["task"]).startswith("gaussian_score") or peak is None \
                or num(r.get("per_s")) is None or num(r.get("d")) is None:
            continue
        d = num(r["d"])
        rank = num(r.get("rank")) or d
        gflops = num(r["per_s"]) * 2 * d * rank / 1e9
        out.append(f"- {r['task']}, {r['tool']}, {threads(r)} thread(s): {gflops:.0f} GFLOP/s, "
                   f"{100 * gflops / num(peak['gflops']):.0f}% of the {num(peak['gflops']):.0f} GFLOP/s "
                   f"a {peak.get('n')}² SGEMM reached")
    return ["", "Gaussian scoring against this CPU's FP32 peak (dense-equivalent: 2·d·r flops per vector; "
            "actwatch's full-rank product is triangular, about half of them):", ""] + out if out else []


def equal_recall(rows: list[dict], target: float = RECALL_TARGET) -> list[str]:
    """HNSW speed at equal recall: per tool and thread count, the smallest ef whose recall@10
    reaches `target`, its queries/s, and actwatch's speed over it at the same thread count."""
    best: dict[tuple[str, int | None], dict] = {}
    for r in rows:
        if r["task"] != "hnsw_query" or num(r.get("recall_at_10")) is None or num(r.get("per_s")) is None:
            continue
        if num(r["recall_at_10"]) < target:
            continue
        key = (str(r.get("tool")), threads(r))
        if key not in best or (num(r.get("ef")) or 0) < (num(best[key].get("ef")) or 0):
            best[key] = r
    if not best:
        return []
    out = [f"HNSW at recall@10 >= {target} (the smallest ef of the curve that reaches it):", "",
           "| tool | thr | ef | recall@10 | queries/s | actwatch/tool |", "|---|---:|---:|---:|---:|---:|"]
    for (tool, thr), r in sorted(best.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        mine = next((v for (t, th), v in best.items() if t.startswith("actwatch") and th == thr), None)
        rel = f"{num(mine['per_s']) / num(r['per_s']):.2f}×" if mine else "—"
        out.append(f"| {tool} | {cell(thr)} | {cell(r.get('ef'))} | {num(r['recall_at_10']):.4f} | "
                   f"{num(r['per_s']):,.0f} | {rel} |")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    peers, pmeta, pprob = load(argv[1])
    mine, ameta, aprob = load(argv[2] if len(argv) > 2 else None)
    header = ["task", "actwatch", "thr", "actwatch figure", "peer", "thr", "peer figure",
              "speed actwatch/peer", "notes"]
    body = build(peers, mine)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] + ["---"] * 2 + ["---:"] * 2 + ["---"]) + "|")
    for r in body:
        print("| " + " | ".join(r) + " |")
    print()
    print("Speed ratio > 1: actwatch faster (throughput ratio for per-second figures, inverse time ratio "
          "for durations).")
    for line in peak_share(pmeta, peers + mine):
        print(line)
    curve = equal_recall(peers + mine)
    if curve:
        print()
        print("\n".join(curve))
    for who, meta in (("peers", pmeta), ("actwatch", ameta)):
        for m in meta:
            kv = ", ".join(f"{k}={v}" for k, v in m.items() if k not in ("task", "tool"))
            print(f"\n{who} environment: {kv}")
    for p in pprob + aprob:
        print(f"\nnote: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
