#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target in fuzz/ and runs each one for a short,
# bounded time, starting from the committed seed corpora (fuzz/seeds/<target>/, captured
# from a real PostgreSQL by fuzz/seedgen). Fails if any target finds a crash, a panic, a
# timeout or an out-of-memory; the reproducer is left in fuzz/artifacts/<target>/.
#
# Usage:  scripts/fuzz-smoke.sh [seconds-per-target]      (default 20, or $FUZZ_SECONDS)
#         FUZZ_TARGETS="tar_stream manifest" scripts/fuzz-smoke.sh    (a subset)
#
# Needs: cargo-fuzz (installed here if missing: `cargo install cargo-fuzz --locked`,
# about a minute) and a C++ compiler for libFuzzer. Nightly features come from the stable
# toolchain through RUSTC_BOOTSTRAP=1. Builds are release with debug assertions and
# overflow checks (cargo-fuzz's default), with AddressSanitizer.
#
# Longer runs (what fuzz/README.md reports):
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> corpus/<target> seeds/<target> \
#       -- -max_total_time=600 -print_final_stats=1
# libFuzzer prints `#N ... cov: C ft: F corp: K exec/s: E` lines: exec/s is the speed,
# cov the number of covered code edges. With llvm-tools (rustup component add
# llvm-tools-preview) `cargo fuzz coverage <target>` gives a source-level report.
# New interesting inputs go to fuzz/corpus/<target>/ (not committed); to refresh the
# committed seeds, re-run the capture:
#   cargo run --manifest-path fuzz/seedgen/Cargo.toml --target-dir target -- fuzz/seeds
set -euo pipefail

seconds=${1:-${FUZZ_SECONDS:-20}}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
echo "fuzz-smoke: building $(echo $targets | wc -w) targets"
cargo fuzz build

failed=()
summary=()
for target in $targets; do
    mkdir -p "corpus/$target"
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    log=$(mktemp)
    echo "fuzz-smoke: $target for ${seconds}s"
    # -rss_limit_mb: a parser that allocates without bound fails here as an OOM.
    if cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
        summary+=("$target: ${runs:-?} runs, ${speed:-?} exec/s, cov ${cov:-?}")
    else
        echo "fuzz-smoke: $target FAILED; the end of its log:"
        tail -40 "$log"
        failed+=("$target")
    fi
    rm -f "$log"
done

if [ ${#summary[@]} -gt 0 ]; then
    printf 'fuzz-smoke: %s\n' "${summary[@]}"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: findings in: ${failed[*]} (reproducers in fuzz/artifacts/)"
    echo "  reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>"
    exit 1
fi
echo "fuzz-smoke: no findings"
