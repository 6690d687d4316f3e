#!/usr/bin/env bash
# Sealing throughput on one core: hyperkeep's two repository ciphers (XAES-256-GCM, the default,
# and XChaCha20-Poly1305) against RustCrypto's complete AEADs of the same constructions, sealing
# and opening 1 MiB objects (crates/repo/examples/bench_seal.rs). Seconds, not minutes.
#
# Usage: bench/seal.sh [MIB]      (default 1024 MiB per measurement)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p repo --example bench_seal
echo "#### seal benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), CPU flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(aes|vaes|pclmulqdq|vpclmulqdq|avx2|avx512f)$' | tr '\n' ' ')"
echo "- hyperkeep $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)'), one thread, 1 MiB objects, ${1:-1024} MiB per measurement"
echo
"$ROOT/target/release/examples/bench_seal" "${1:-1024}"
