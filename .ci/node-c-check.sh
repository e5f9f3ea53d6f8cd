#!/usr/bin/env bash
# Builds the node's C static library (crates/microcert-node-ffi), checks
# that the committed header and the C known answers are current, compiles
# the C test program with gcc against the header, links it with the
# library, runs it. Exits non-zero on any failure. Run from anywhere.
#
# NODE_C_PROFILE=release builds the library in release mode (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${NODE_C_PROFILE:-dev}
if [ "$profile" = release ]; then dir=release; else dir=debug; fi
CC=${CC:-gcc}
command -v "$CC" >/dev/null || { echo "node-c-check: $CC not found" >&2; exit 1; }

crate=crates/microcert-node-ffi
# The header and the vectors the C program includes are what the library
# makes (both tests fail when the committed files are stale).
cargo test -q -p microcert-node-ffi --test header --test c_vectors
# The firmware build: no std, no alloc, the crate's own panic handler
# (std anywhere in the tree would fail it with a duplicate `panic_impl`).
cargo rustc -q -p microcert-node-ffi --profile "$profile" --no-default-features \
    --lib --crate-type staticlib -- -C panic=abort
# The host build the C program links (std's panic handler).
cargo build -q -p microcert-node-ffi --profile "$profile"

target_dir=$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
lib="$target_dir/$dir/libmicrocert_node_ffi.a"
[ -f "$lib" ] || { echo "node-c-check: $lib missing" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Strict C11; every warning is an error.
"$CC" -std=c11 -Wall -Wextra -Werror -pedantic -O1 \
    -I "$crate/include" -I "$crate/c" \
    -o "$out/node_test" "$crate/c/node_test.c" "$lib" \
    -lpthread -ldl -lm
"$out/node_test"
echo "node-c-check: ok"
