#!/usr/bin/env bash
# Benchmark: incremental replication (`hyperkeep replicate`) against a full copy.
#
# Input (the approach of bench/backup.sh): a SIZE (default 4G) disk holding an ext4 filesystem
# filled to ~45% with real files copied from /usr, as a dynamic VHDX made by qemu-img; and the
# same VM with CHANGE_PCT (default 1) % of its file data rewritten (same files, new random
# content, filesystem rebuilt by mke2fs with the same UUID, hash seed and clock, so only the
# rewritten files' blocks differ).
#
# Steps:
#   backup + replicate   the base image: version 1 (a full dynamic VHDX in the replica)
#   backup + replicate   the changed image: version 2 (a differencing layer with the changes);
#                        bytes written, replica growth (du) and wall time of the replicate
#   full copy            `qemu-img convert -O vhdx` of the changed image: what a replica that
#                        copies everything writes each cycle
#   chain depth          KEEP-2 more versions (CHANGE_PCT % of the disk rewritten by qemu-io in
#                        64 KiB pieces each), then the newest version read through its depth-KEEP
#                        chain against the same version flattened (`replica failover --flatten`)
# Prints a markdown report (also written to bench/out/replicate-SIZE.md).
#
# Usage: bench/replicate.sh              full run (4 GiB image, ~10 min on 2 cores, ~15 GiB scratch)
#        SIZE=256M bench/replicate.sh    quick check of the script
# Env: SIZE, CHANGE_PCT, KEEP (default 4), WORK (scratch, default bench/out/replicate-work).
set -euo pipefail
shopt -s inherit_errexit

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
SIZE=${SIZE:-4G}
CHANGE_PCT=${CHANGE_PCT:-1}
KEEP=${KEEP:-4}
WORK=${WORK:-$ROOT/bench/out/replicate-work}
OUTDIR=$ROOT/bench/out
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "bench/replicate.sh: ERROR: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

for t in qemu-img qemu-io mke2fs cargo jq python3; do
    command -v $t >/dev/null || die "missing $t (apt-get install qemu-utils e2fsprogs jq python3)"
done
[ "$KEEP" -ge 2 ] || die "KEEP must be at least 2"
size_bytes=$(numfmt --from=iec "$SIZE") || die "SIZE=$SIZE: use a size like 256M or 4G"
rm -rf "$WORK"
mkdir -p "$WORK" "$OUTDIR"

log "building hyperkeep (release)"
cargo build --release -q -p hyperkeep
HK=$ROOT/target/release/hyperkeep
[ -x "$HK" ] || die "cargo build did not produce $HK"

# ---------------------------------------------------------------------------------------------
# Input images
budget=$((size_bytes * 45 / 100))
staging=$WORK/staging
mkdir -p "$staging"
log "staging ~$((budget >> 20)) MiB of real files from /usr"
stage_usr_files "$staging" "$budget"
staged=$(du -sb "$staging" | cut -f1)
mkfs_ext4 "$staging" "$WORK/base.raw" "$size_bytes"
target=$((staged * CHANGE_PCT / 100))
log "rewriting ~$((target >> 20)) MiB of files ($CHANGE_PCT %)"
# Same size, same inode, new content; files with an all-zero 1 KiB block are skipped (mke2fs
# leaves those as holes, and filling them would shift the layout of later files).
rewritten=$(rewrite_files "$staging" "$target")
mkfs_ext4 "$staging" "$WORK/changed.raw" "$size_bytes"
rm -rf "$staging"
BASE=$WORK/base.vhdx
CHANGED=$WORK/changed.vhdx
qemu-img convert -f raw -O vhdx -o subformat=dynamic "$WORK/base.raw" "$BASE"
qemu-img convert -f raw -O vhdx -o subformat=dynamic "$WORK/changed.raw" "$CHANGED"
rm -f "$WORK/base.raw" "$WORK/changed.raw"

# ---------------------------------------------------------------------------------------------
export HYPERKEEP_REPOSITORY=$WORK/repo HYPERKEEP_PASSWORD=bench-password
"$HK" init >/dev/null
mkdir -p "$WORK/vm"
VMDISK=$WORK/vm/disk.vhdx
echo "bench VM definition" >"$WORK/vm/bench.vmcx"
TO=$WORK/replicas
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
du_b() { du -sb --apparent-size "$1" | cut -f1; }  # apparent: what a copy would transfer
du_alloc() { du -sB1 "$1" | cut -f1; }             # allocated: what the storage holds
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }

backup() {
    "$HK" backup --vm bench "$VMDISK" "$WORK/vm/bench.vmcx" >/dev/null
}
replicate() { # -> sets rep_secs, rep_written; json in $WORK/rep.json
    local t0 t1
    sync
    t0=$(now)
    "$HK" --json replicate --vm bench --to "$TO" --keep "$KEEP" >"$WORK/rep.json"
    sync
    t1=$(now)
    rep_secs=$(secs "$t0" "$t1")
    rep_written=$(jq '.bytes_written' "$WORK/rep.json")
}

log "version 1: backup and replicate the base image"
cp --sparse=always "$BASE" "$VMDISK"
backup
replicate
v1_secs=$rep_secs
v1_written=$rep_written
alloc1=$(du_alloc "$TO")

log "version 2: backup and replicate the changed image"
cp --sparse=always "$CHANGED" "$VMDISK"
backup
snaps=$("$HK" --json snapshots --vm bench)
changed_snap=$("$HK" --json diff "$(jq -r '.[-2].id' <<<"$snaps")" "$(jq -r '.[-1].id' <<<"$snaps")" |
    jq '.changed_bytes')
replicate
v2_secs=$rep_secs
v2_written=$rep_written
alloc2=$(du_alloc "$TO")
layer=$(jq -r '.disks[0].file' "$WORK/rep.json")
layer_alloc=$(du_alloc "$TO/bench/disks/$layer")

log "full copy: qemu-img convert -O vhdx of the changed image"
sync
t0=$(now)
qemu-img convert -f vhdx -O vhdx -o subformat=dynamic "$CHANGED" "$WORK/full.vhdx"
sync
t1=$(now)
full_secs=$(secs "$t0" "$t1")
full_alloc=$(du_alloc "$WORK/full.vhdx")

log "versions 3..$KEEP: $CHANGE_PCT % of the disk rewritten by qemu-io each"
pieces=$((size_bytes * CHANGE_PCT / 100 / 65536))
io_rows=""
for v in $(seq 3 "$KEEP"); do
    cmds=()
    for i in $(seq 1 "$pieces"); do
        off=$(( (RANDOM * 32768 + RANDOM) % (size_bytes / 65536) * 65536 ))
        cmds+=(-c "write -P $((v + i % 200)) $off 64k")
    done
    qemu-io -f vhdx "${cmds[@]}" "$VMDISK" >/dev/null
    backup
    a0=$(du_alloc "$TO")
    replicate
    io_rows+="| version $v (incremental, $pieces random 64 KiB guest writes = $CHANGE_PCT % of the disk) | $(mib "$rep_written") | $(mib $(($(du_alloc "$TO") - a0))) | $rep_secs |"$'\n'
done
depth=$("$HK" --json replica list "$TO" | jq '[.[0].versions[-1].disks[0].chain_depth] | max')
newest_path=$("$HK" --json replica list "$TO" | jq -r '.[0].versions[-1].disks[0].file')

log "read the newest version through its chain (depth $depth) and flattened"
"$HK" replica failover "$TO" --flatten >/dev/null
FLAT=$TO/bench/failover/disk.vhdx
read_secs() { # disk -> seconds to read its whole view (hyperkeep disk convert to raw)
    rm -f "$WORK/read.raw"
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1
    t0=$(now)
    "$HK" disk convert "$1" "$WORK/read.raw" >/dev/null
    t1=$(now)
    rm -f "$WORK/read.raw"
    secs "$t0" "$t1"
}
chain_secs=$(read_secs "$newest_path")
flat_secs=$(read_secs "$FLAT")
rm -rf "$TO/bench/failover"

"$HK" replica verify "$TO" >/dev/null || die "replica verify found problems"

ratio() { python3 -c "print(f'{$1 / max($2, 1):.3f}')"; }
REPORT=$OUTDIR/replicate-$SIZE.md
{
    echo "## Replication: $SIZE disk, $CHANGE_PCT % changed"
    echo
    echo "Input: ext4 with $(mib "$staged") MiB of files from /usr; $(mib "$rewritten") MiB of them rewritten"
    echo "(${changed_snap:-?} bytes of changed chunks between the two snapshots). Machine: $(nproc) cores."
    echo
    echo "| cycle | guest bytes written, MiB | replica growth (allocated), MiB | wall time, s |"
    echo "|---|---:|---:|---:|"
    echo "| version 1 (full) | $(mib "$v1_written") | $(mib "$alloc1") | $v1_secs |"
    echo "| version 2 (incremental, $CHANGE_PCT % changed) | $(mib "$v2_written") | $(mib $((alloc2 - alloc1))) (layer $(mib "$layer_alloc")) | $v2_secs |"
    printf '%s' "$io_rows"
    echo "| full copy (qemu-img convert -O vhdx) | - | $(mib "$full_alloc") | $full_secs |"
    echo
    echo "Incremental cycle against a full copy: bytes $(ratio $((alloc2 - alloc1)) "$full_alloc"), time $(ratio "$v2_secs" "$full_secs")."
    echo
    echo "| read of the newest version (hyperkeep disk convert to raw) | seconds |"
    echo "|---|---:|"
    echo "| through its differencing chain (depth $depth) | $chain_secs |"
    echo "| flattened (replica failover --flatten) | $flat_secs |"
} | tee "$REPORT"
log "report written to $REPORT"
