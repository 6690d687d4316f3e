#!/usr/bin/env bash
# Regenerate the committed seed corpus (fuzz/corpus/<target>/) from real images made by qemu-img
# and written with qemu-io, encoded by `encode_corpus` (see src/lib.rs for the encoding).
# Small virtual sizes and small writes keep every seed at a few KiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
for t in qemu-img qemu-io; do command -v $t >/dev/null || { echo "missing $t (apt-get install qemu-utils)" >&2; exit 1; }; done
cargo build -q --bin encode_corpus
ENC=$(pwd)/target/debug/encode_corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Writes at odd offsets: inside a sector, across sectors, across a 1 MiB block boundary, and the
# last sector of the disk, so BAT entries, sector bitmaps and block edges all appear in the seeds.
scribble() { # FORMAT FILE SIZE_BYTES
    qemu-io -f "$1" \
        -c 'write -P 0xa5 512 512' \
        -c 'write -P 0x3c 4608 1536' \
        -c "write -P 0x81 $((1048576 - 512)) 1024" \
        -c "write -P 0x7e $(($3 - 512)) 512" \
        "$2" >/dev/null
}

seed() { # TARGET NAME FILE
    mkdir -p "corpus/$1"
    "$ENC" encode "$3" "corpus/$1/$2" 2>/dev/null
    printf '  %-12s %-34s %6d bytes\n' "$1" "$2" "$(stat -c %s "corpus/$1/$2")"
}

size=$((8 << 20))
for bs in 1M 8M 32M; do
    for bsz in on off; do
        f=$work/dyn-$bs-$bsz.vhdx
        qemu-img create -q -f vhdx -o subformat=dynamic,block_size=$bs,block_state_zero=$bsz "$f" $size
        seed vhdx_open "dynamic-$bs-zero$bsz-empty" "$f"
        scribble vhdx "$f" $size
        seed vhdx_open "dynamic-$bs-zero$bsz-written" "$f"
    done
done
f=$work/fixed.vhdx
qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M "$f" $size
scribble vhdx "$f" $size
seed vhdx_open fixed-1M-written "$f"
# An odd virtual size (not a multiple of the block size).
f=$work/odd.vhdx
qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M "$f" $((size + 3 * 512))
scribble vhdx "$f" $((size + 3 * 512))
seed vhdx_open dynamic-1M-oddsize-written "$f"

for sub in dynamic fixed; do
    for fs in off on; do
        f=$work/$sub-$fs.vhd
        qemu-img create -q -f vpc -o subformat=$sub,force_size=$fs "$f" $size
        seed vhd_open "$sub-forcesize$fs-empty" "$f"
        # 8 MiB, not qemu's reported size: for a fixed VHD without force_size qemu reports the
        # file size (footer included), and writing its "last sector" would hit the footer.
        scribble vpc "$f" $size
        seed vhd_open "$sub-forcesize$fs-written" "$f"
    done
done

# Seeds from hyperkeep's own writer: differencing layers and 4 KiB sectors.
"$ENC" own corpus
