#!/usr/bin/env bash
# Rebuilds crates/haven-safety/model/crisis-model.safetensors from the
# labelled data, and prints its SHA-256 (record it as BUILTIN_SHA256 in
# crates/haven-safety/src/model.rs). Training only; needs Python 3.11 and
# the packages of requirements.txt, from PyPI.
#
#   scripts/safety-model/train.sh VERSION [--distill]
#
# The head is trained from the labelled data; the token vectors are taken
# from the shipped model file, so the same data gives the same file, byte
# for byte. `--distill` makes new token vectors from the encoder first
# (distill.py): the encoder's floating-point sums depend on the machine's
# BLAS, so a distillation elsewhere differs by one int8 step on some tokens.
set -euo pipefail
# OpenBLAS picks its kernels by processor, and kernels sum in different
# orders: pinned, every x86-64 machine with AVX2 trains the same file.
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Haswell}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=${1:?usage: train.sh VERSION [--distill]}
venv=${HAVEN_SAFETY_VENV:-$root/target/safety-model/venv}
work=$root/target/safety-model
model=$root/crates/haven-safety/model/crisis-model.safetensors
mkdir -p "$work"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-deps -r "$here/requirements.txt"
fi
encoder=$work/vectors.safetensors
if [ "${2:-}" = "--distill" ]; then
  "$venv/bin/python" "$here/distill.py" "$encoder"
else
  cp "$model" "$encoder"
fi
cargo build --quiet --release -p haven-safety --example features
"$venv/bin/python" "$here/train.py" \
  --encoder "$encoder" \
  --features "$root/target/release/examples/features" \
  --out "$model" \
  --version "$version"
