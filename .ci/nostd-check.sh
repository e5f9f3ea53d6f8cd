#!/usr/bin/env bash
# Proves that microcert-core (and microcert-node) use neither std nor alloc.
#
# 1. If the bare-metal target thumbv7em-none-eabihf is installed (or can be
#    installed), build microcert-core for it (no std exists there) and the
#    nostd-check staticlib for it (which also links the node and fails if
#    an allocator is needed).
# 2. Otherwise, build the nostd-check staticlib for the host: it has its
#    own #[panic_handler], so std anywhere in the tree fails the build with
#    "duplicate lang item `panic_impl`", and alloc with "no global memory
#    allocator found".
#
# Either way the script exits non-zero when the proof fails. Run from the
# repository root. NOSTD_CHECK_HOST=1 skips the bare-metal build (to
# exercise the fallback).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=thumbv7em-none-eabihf

have_target() {
    rustup target list --installed 2>/dev/null | grep -qx "$TARGET"
}

if [ "${NOSTD_CHECK_HOST:-0}" = 1 ]; then
    have_target() { false; }
fi

if ! have_target && command -v rustup >/dev/null; then
    # Downloads may fail on a machine without network: fall back below.
    rustup target add "$TARGET" >/dev/null 2>&1 || true
fi

if have_target; then
    echo "nostd-check: building microcert-core for $TARGET"
    cargo build -p microcert-core --target "$TARGET"
    echo "nostd-check: building the node with forward-secret (P-256) for $TARGET"
    cargo build -p microcert-node --features forward-secret --target "$TARGET"
    echo "nostd-check: building the no_std staticlib (core + node) for $TARGET"
    (cd nostd-check && cargo build --release --target "$TARGET")
    echo "nostd-check: ok ($TARGET: no std, no alloc)"
else
    echo "nostd-check: $TARGET not available, building the no_std staticlib for the host"
    (cd nostd-check && cargo build --release)
    echo "nostd-check: ok (host staticlib with its own panic handler: no std, no alloc)"
fi
