#!/usr/bin/env bash
# Every fuzz target for a bounded time (FUZZ_SECONDS each, default 10),
# starting from the committed corpus: a crash, a leak of the time budget
# or a build failure fails CI. Built on stable Rust without cargo-fuzz:
# the same instrumentation flags cargo-fuzz passes (SanitizerCoverage for
# libFuzzer, no sanitizer), on the fuzz directory's own workspace.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-10}"
host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
# The target triple keeps these flags off build scripts.
RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --locked --target "$host" --bins -q
bins=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^microcert-fuzz$')
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in $bins; do
    mkdir -p "$work/$t" "$work/artifacts/$t"
    # A copy of the committed corpus: what the run finds stays out of git.
    [ -d "corpus/$t" ] && cp -r "corpus/$t/." "$work/$t/"
    if ! "$CARGO_TARGET_DIR/$host/release/$t" "$work/$t" \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=1024 \
        -artifact_prefix="$work/artifacts/$t/" -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        echo "fuzz target $t failed:" >&2
        tail -40 "$work/$t.log" >&2
        ls -la "$work/artifacts/$t" >&2
        for f in "$work/artifacts/$t"/*; do
            [ -f "$f" ] && { echo "input $f:"; xxd "$f" | head -20; } >&2
        done
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
    echo "fuzz $t: ${runs:-?} runs in ${seconds}s, no crash"
done
