#!/bin/sh
# Code size and worst-case stack of microcert-node on thumbv7em-none-eabihf
# (Cortex-M4F), release, opt-level "z", LTO, panic = abort.
# Run from anywhere: crates/microcert-node/size-check/measure.sh
# Needs: rustup target thumbv7em-none-eabihf, llvm-size, llvm-nm,
# llvm-objdump, llvm-readobj (Debian llvm-14 works), python3.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${TARGET_DIR:-$here/../../../target}/size-check
lld=$(find "$(rustc --print sysroot)" -name rust-lld -type f | head -n 1)

link() { # $1 = staticlib, $2 = output ELF
	roots=$(llvm-nm --defined-only -g "$1" 2>/dev/null | awk '$3 ~ /^mc_/ { print "-u " $3 }' | sort -u)
	# shellcheck disable=SC2086
	"$lld" -flavor gnu --gc-sections --entry=mc_auth $roots \
		--defsym=platform_random=0 -o "$2" "$1"
}

cd "$here"
cargo build --release --target thumbv7em-none-eabihf --target-dir "$out/plain" -q
link "$out/plain/thumbv7em-none-eabihf/release/libmicrocert_node_size_check.a" "$out/node.elf"
echo "== code size (every mc_* entry point and all it reaches, linked with --gc-sections)"
llvm-size -A "$out/node.elf" | grep -E '^(\.text|\.rodata|\.ARM\.exidx|\.data|\.bss) '
llvm-size "$out/node.elf"

# The same build with rustc's per-function stack sizes, for the call graph.
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Z emit-stack-sizes" \
	cargo build --release --target thumbv7em-none-eabihf --target-dir "$out/stack" -q
link "$out/stack/thumbv7em-none-eabihf/release/libmicrocert_node_size_check.a" "$out/node-stack.elf"
echo "== worst-case stack (static call graph)"
python3 "$here/stack_graph.py" "$out/node-stack.elf" mc_auth mc_seal mc_sign \
	mc_auth_response mc_receipt mc_command mc_enroll mc_load mc_save | grep -E '^mc_'
