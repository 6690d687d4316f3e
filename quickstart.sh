#!/usr/bin/env bash
# hyperkeep quickstart: build hyperkeep, make a small sample VM (a disk and a configuration file),
# take the disk through the virtual-disk layer (raw -> VHDX -> VHD -> raw, check, a checkpoint
# child), then through the whole backup cycle: create an encrypted repository, back the VM up,
# change its disk, back it up again (incremental: only the change is stored), list snapshots,
# verify every stored byte, restore both versions and prove they are identical to the originals.
#
# Needs: a Rust toolchain (cargo >= 1.87). No root. Everything goes to ./quickstart-out/.
# Runs in well under a minute after the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export PATH="$HOME/.cargo/bin:$PATH"
OUT=quickstart-out
SIZE=256M
# The quickstart is what a user sees: always the real key derivation (argon2id, 64 MiB).
unset HYPERKEEP_TEST_FAST_KDF HYPERKEEP_PASSWORD

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
# Commands are shown as `hyperkeep ...`; the binary is $TARGET/hyperkeep.
HK() { run hyperkeep "$@"; }
hyperkeep() { "$TARGET/hyperkeep" "$@"; }
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

step "8. A sample VM and a new, encrypted backup repository"
say "The VM 'sample' is what Hyper-V keeps in its folder: a dynamic VHDX and a configuration file"
say "(.vmcx; ours is a stand-in). The repository is a directory; its password is read from a file"
say "(or HYPERKEEP_PASSWORD, or a prompt). The master key is wrapped by argon2id (64 MiB, slow on"
say "purpose), so every command spends a moment on the password."
mkdir -p "$OUT/vm"
cp "$OUT/disk.vhdx" "$OUT/vm/sample.vhdx"
printf '<configuration vm="sample" generation="2" memory_mb="2048"/>\n' >"$OUT/vm/sample.vmcx"
(umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$OUT/password")
export HYPERKEEP_REPOSITORY="$OUT/repo" HYPERKEEP_PASSWORD_FILE="$OUT/password"
say "export HYPERKEEP_REPOSITORY=$OUT/repo HYPERKEEP_PASSWORD_FILE=$OUT/password"
HK init

step "9. First backup of the VM"
say "Only the VHDX's allocated blocks are read; the disk is cut into 1 MiB chunks, each hashed,"
say "compressed (zstd), encrypted and packed. All-zero chunks are recorded, never stored."
HK backup --vm sample --tag site=quickstart "$OUT/vm/sample.vhdx" "$OUT/vm/sample.vmcx"

step "10. The VM changes its disk"
say "The guest writes 3 MiB (here: random bytes into free space of its FAT partition, at 100 MiB)"
say "and its configuration changes. We write into a raw copy and convert it to the VM's VHDX again."
cp --sparse=always "$OUT/disk.raw" "$OUT/disk-v2.raw"
run dd if=/dev/urandom of="$OUT/disk-v2.raw" bs=1M seek=100 count=3 conv=notrunc status=none
rm "$OUT/vm/sample.vhdx"
HK disk convert "$OUT/disk-v2.raw" "$OUT/vm/sample.vhdx"
printf '<configuration vm="sample" generation="2" memory_mb="4096"/>\n' >"$OUT/vm/sample.vmcx"

step "11. Second backup: incremental"
say "Everything allocated is read again, but only chunks the repository does not hold yet are"
say "stored: 'new data' is the change, not the disk."
HK backup --vm sample --tag site=quickstart "$OUT/vm/sample.vhdx" "$OUT/vm/sample.vmcx"

step "12. The version history"
HK snapshots
first=$(hyperkeep snapshots --vm sample | awk 'NR == 2 { print $1 }')
say "What changed between the first snapshot ($first) and the latest:"
HK diff "$first" latest
HK stats

step "13. Verify every stored byte (exit 0 = clean, 1 = problems)"
say "--read-data reads each pack, checks its hash, decrypts and authenticates every chunk."
HK check --read-data

step "14. Restore both versions and compare them with the originals"
HK restore latest --target "$OUT/restore"
HK disk convert "$OUT/restore/sample.vhdx" "$OUT/restore-latest.raw"
run cmp "$OUT/disk-v2.raw" "$OUT/restore-latest.raw"
run cmp "$OUT/vm/sample.vmcx" "$OUT/restore/sample.vmcx"
HK restore "$first" --target "$OUT/restore-first"
HK disk convert "$OUT/restore-first/sample.vhdx" "$OUT/restore-first.raw"
run cmp "$OUT/disk.raw" "$OUT/restore-first.raw"
say "Both versions came back byte-identical: the changed disk, and the disk as it was before."
if command -v qemu-img >/dev/null; then
    run qemu-img compare -f raw -F vhdx "$OUT/disk-v2.raw" "$OUT/restore/sample.vhdx"
    run qemu-img check -f vhdx "$OUT/restore/sample.vhdx"
fi

step "15. Files inside the backup, without restoring the disk"
say "hyperkeep reads the partition table and the FAT32 filesystem straight from the snapshot;"
say "only the chunks these reads touch are fetched and decrypted."
HK ls latest --vm sample / --long --recursive
HK cat latest --vm sample /README.TXT
HK restore latest --vm sample --include /DATA/RANDOM.BIN --target "$OUT/files"
say "The same file read from the original disk image:"
hyperkeep cat "$OUT/disk.raw" /DATA/RANDOM.BIN >"$OUT/RANDOM.BIN.orig"
run cmp "$OUT/RANDOM.BIN.orig" "$OUT/files/DATA/RANDOM.BIN"
if command -v mcopy >/dev/null; then
    say "Cross-check with an independent FAT reader (mtools):"
    run mcopy -n -i "$OUT/disk.raw@@1M" ::/DATA/RANDOM.BIN "$OUT/RANDOM.BIN.mtools"
    run cmp "$OUT/RANDOM.BIN.mtools" "$OUT/files/DATA/RANDOM.BIN"
fi
HK find 'readme*' --vm sample

step "16. A native replica on a recovery server, with its versions"
say "replicate writes the snapshots as VHDX disks another Hyper-V host can start: the first"
say "version in full, each later one as a differencing disk holding only what changed."
rm -rf "$OUT/replicas"
HK replicate --vm sample --to "$OUT/replicas" --keep 3 --snapshot "$first"
HK replicate --vm sample --to "$OUT/replicas" --keep 3
HK replica list "$OUT/replicas"
HK replica verify "$OUT/replicas"
HK replica failover "$OUT/replicas" --flatten
HK disk convert "$OUT/replicas/sample/failover/sample.vhdx" "$OUT/replica-latest.raw"
run cmp "$OUT/disk-v2.raw" "$OUT/replica-latest.raw"
say "The newest replica version, flattened for a hypervisor that cannot follow a chain, is the"
say "changed disk byte for byte."

step "Done in $((SECONDS - START)) s (after the build)"
ls -ls "$OUT" "$OUT/restore"
say "The first column is the space each file really uses on disk (KiB); the sizes next to it are"
say "the files' apparent sizes. The repository: du -sh $OUT/repo -> $(du -sh "$OUT/repo" | cut -f1)."
say "Try: $TARGET/hyperkeep --json snapshots   (with the two variables above exported)"
