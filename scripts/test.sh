#!/usr/bin/env bash
# Everything CI checks, in the order that fails fastest: format, lints, tests (release, so the
# numerical tests run at real speed), and a compile check of the CUDA build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
export SIMMIM_PARITY_DIR="${SIMMIM_PARITY_DIR:-$root/../shared/fixtures/parity}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build --release (the binaries the system tests run)"
cargo build --release --workspace --bins
echo "== cargo test --release"
cargo test --workspace --release
echo "== cargo check --features cuda"
cargo check -p simmim-model -p simmim-worker --all-targets --features cuda
echo "== all checks passed"
