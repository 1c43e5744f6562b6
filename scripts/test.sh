#!/usr/bin/env bash
# Installs what the tests need, then runs every test: lints, unit and doc tests once,
# the real-server integration tests once per PostgreSQL major version (13-18), and
# PostgreSQL 15's own TAP suites against our drop-in front-ends.
#
#   scripts/test.sh                 # everything, then a benchmark smoke run and a fuzz smoke
#   PGREPL_TEST_VERSIONS="15 17" scripts/test.sh   # only some server versions
#
# It is what .ci/run runs. It exits non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

versions=${PGREPL_TEST_VERSIONS:-13 14 15 16 17 18}

step() { printf '\n==== %s ====\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install a Rust toolchain (https://rustup.rs, or Debian's cargo) and run this again" >&2
    exit 1
fi

step "installing PostgreSQL servers (scripts/install-postgres.sh)"
scripts/install-postgres.sh

step "installing the libpq 18 and pg_combinebackup 18 oracles for differential tests (scripts/install-test-tools.sh)"
scripts/install-test-tools.sh

step "installing the Garage S3 store for object-storage tests (scripts/install-garage.sh)"
scripts/install-garage.sh

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "building tests"
cargo test --workspace --locked --no-run

step "unit, property and doc tests"
cargo test --workspace --locked --lib --bins
cargo test --workspace --locked --doc

failed=()
for version in $versions; do
    step "integration tests against PostgreSQL $version"
    if ! PGREPL_TEST_PG=$version cargo test --workspace --locked --no-fail-fast --test '*'; then
        failed+=("PostgreSQL $version")
    fi
done

step "PostgreSQL 15's own TAP suites against our pg_basebackup, pg_receivewal and pg_verifybackup (scripts/pg-tap.sh)"
if ! scripts/pg-tap.sh; then
    failed+=("PostgreSQL TAP suites")
fi

step "benchmark harness smoke run (tiny scale, one round)"
if ! cargo run --release --locked -p benches --bin compare -- --smoke; then
    failed+=("benchmark smoke")
fi

step "fuzz smoke: every target for a short, bounded time"
if ! scripts/fuzz-smoke.sh 20; then
    failed+=("fuzzing")
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
step "all tests passed on PostgreSQL $versions"
