#!/usr/bin/env bash
# hyperkeep quickstart: build hyperkeep, make a small sample VM disk, and take it through the
# virtual-disk layer: convert raw -> VHDX -> VHD -> raw, inspect and check every file, create a
# differencing child (what a Hyper-V checkpoint is), and prove the round trip lost nothing.
#
# Needs: a Rust toolchain (cargo >= 1.87). No root. Everything goes to ./quickstart-out/.
# Runs in well under a minute after the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export PATH="$HOME/.cargo/bin:$PATH"
OUT=quickstart-out
SIZE=256M

bold=$'\033[1m'
dim=$'\033[2m'
reset=$'\033[0m'
if [ ! -t 1 ]; then bold='' dim='' reset=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$reset"; }
say() { printf '%s%s%s\n' "$dim" "$*" "$reset"; }
run() {
    printf '$ %s\n' "$*"
    "$@"
}

command -v cargo >/dev/null || {
    echo "quickstart.sh: cargo not found. Install Rust (>= 1.87, e.g. from https://rustup.rs) and run again." >&2
    exit 1
}

step "0. Build hyperkeep (release)"
say "One binary, hyperkeep, plus make-sample-disk from the test kit."
cargo build --release --quiet -p hyperkeep -p testkit
TARGET=${CARGO_TARGET_DIR:-target}/release
HK() { run "$TARGET/hyperkeep" "$@"; }
START=$SECONDS

rm -rf "$OUT"
mkdir -p "$OUT"

step "1. A sample VM disk (raw image)"
say "GPT partition table, one EFI system partition at 1 MiB, FAT32 with a few files (one is"
say "2 MiB of pseudo-random bytes). The image is sparse: free space is a hole, as on a thin disk."
run "$TARGET/make-sample-disk" "$OUT/disk.raw" --size "$SIZE"
if command -v sfdisk >/dev/null; then
    say "sfdisk sees the partition table:"
    sfdisk -l "$OUT/disk.raw" | sed -n '/^Device/,$p'
fi
if command -v mdir >/dev/null; then
    say "mtools reads the files inside the partition:"
    mdir -/ -b -i "$OUT/disk.raw@@1M" ::
fi

step "2. raw -> dynamic VHDX (what Hyper-V uses)"
say "Only the allocated ranges of the source are read; zeros and holes stay unallocated."
HK disk convert "$OUT/disk.raw" "$OUT/disk.vhdx"
HK disk info "$OUT/disk.vhdx"

step "3. VHDX -> VHD (the older format, still what Azure takes)"
HK disk convert "$OUT/disk.vhdx" "$OUT/disk.vhd"
HK disk info "$OUT/disk.vhd"

step "4. VHD -> raw again"
HK disk convert "$OUT/disk.vhd" "$OUT/roundtrip.raw"
HK disk info "$OUT/roundtrip.raw"

step "5. Check every file's structure (exit 0 = clean, 1 = problems, 2 = cannot open)"
for f in disk.raw disk.vhdx disk.vhd roundtrip.raw; do
    HK disk check "$OUT/$f"
done

step "6. A differencing child of the VHDX (a Hyper-V checkpoint's .avhdx)"
say "The child records only what changes; everything else is read from its parent."
HK disk create-child "$OUT/disk.vhdx" "$OUT/disk-checkpoint.avhdx"
HK disk info "$OUT/disk-checkpoint.avhdx"
HK disk check "$OUT/disk-checkpoint.avhdx"

step "7. Did the round trip lose anything?"
run cmp "$OUT/disk.raw" "$OUT/roundtrip.raw"
say "raw -> VHDX -> VHD -> raw: byte-identical."
if command -v qemu-img >/dev/null; then
    say "Cross-check with an independent implementation (qemu-img):"
    run qemu-img compare -f raw -F vhdx "$OUT/disk.raw" "$OUT/disk.vhdx"
    run qemu-img compare -f raw -F vpc "$OUT/disk.raw" "$OUT/disk.vhd"
fi

step "Done in $((SECONDS - START)) s (after the build)"
ls -ls "$OUT"
say "The first column is the space each file really uses on disk (KiB); the sizes next to it are"
say "the files' apparent sizes. Try: $TARGET/hyperkeep --json disk info $OUT/disk-checkpoint.avhdx"
