#!/usr/bin/env bash
# Rebuilds crates/haven-safety/model/crisis-model.safetensors from the
# labelled data, and prints its SHA-256 (record it as BUILTIN_SHA256 in
# crates/haven-safety/src/model.rs). Training only; needs Python 3.11 and
# the packages of requirements.txt, from PyPI.
#
#   scripts/safety-model/train.sh [VERSION]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=${1:-2026.12.1}
venv=${HAVEN_SAFETY_VENV:-$root/target/safety-model/venv}
work=$root/target/safety-model
mkdir -p "$work"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-deps -r "$here/requirements.txt"
fi
# The distilled token vectors depend only on the encoder: made once.
if [ ! -f "$work/encoder.safetensors" ]; then
  "$venv/bin/python" "$here/distill.py" "$work/encoder.safetensors"
fi
cargo build --quiet --release -p haven-safety --example features
"$venv/bin/python" "$here/train.py" \
  --encoder "$work/encoder.safetensors" \
  --features "$root/target/release/examples/features" \
  --out "$root/crates/haven-safety/model/crisis-model.safetensors" \
  --version "$version"
