#!/usr/bin/env bash
# Benchmark: hyperkeep backup against restic and borg, in one run, on the same image files.
#
# Input: a SIZE (default 4G) disk holding an ext4 filesystem filled to ~45% with real files
# copied from /usr, plus free space, as a dynamic VHDX made by qemu-img (what a VM's disk looks
# like to a backup); and "the same VM with CHANGE_PCT (default 2) % of its data changed": the same
# files with every n-th file (CHANGE_PCT % of the bytes) rewritten with new random content, the
# filesystem rebuilt by mke2fs with the same UUID, hash seed and clock, so the layout is the same
# and only the rewritten files' blocks (and their inodes) differ.
#
# Steps, each timed with /usr/bin/time (wall seconds, peak RSS), every tool at its defaults:
#   first backup     of vm/disk.vhdx (the base image)
#   second backup    of vm/disk.vhdx after it was replaced by the changed image (same path)
#   change-list      hyperkeep only: the changes written into a differencing child of the base
#                    (`hyperkeep disk create-child`, then the differing 4 KiB blocks through vdisk:
#                    crates/repo/examples/bench_write_changes.rs), backed up with
#                    `--changes-from child --parent FIRST`: reads only the changed ranges
#   restore          of the second backup, verified with `qemu-img compare` against the changed
#                    image (and hyperkeep's change-list snapshot is verified the same way)
#   repository size  du after all backups
# Plus this machine's limit for the first backup: read the allocated bytes, BLAKE3 and zstd -1
# them on all cores (crates/repo/examples/bench_limit.rs), and hyperkeep's peak memory backing up
# a SPARSE_SIZE (default 64G) sparse VHDX with data spread over it.
#
# Usage: bench/backup.sh              full run (4 GiB image; ~20 min on 2 cores; ~20 GiB scratch)
#        SIZE=512M bench/backup.sh    quick check of the script
# Env: SIZE, CHANGE_PCT, SPARSE_SIZE, FIRST_RUNS (default 3), BORG_FIXED=0 (skip the second borg row with a fixed 4 MiB
#      chunker), WORK (scratch dir, default bench/out/backup-work), KEEP_INPUT=1 (reuse images).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
SIZE=${SIZE:-4G}
CHANGE_PCT=${CHANGE_PCT:-2}
SPARSE_SIZE=${SPARSE_SIZE:-64G}
FIRST_RUNS=${FIRST_RUNS:-3}
BORG_FIXED=${BORG_FIXED:-1}
WORK=${WORK:-$ROOT/bench/out/backup-work}
OUTDIR=$ROOT/bench/out
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "bench/backup.sh: ERROR: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

for t in qemu-img qemu-io mke2fs cargo restic borg; do
    command -v $t >/dev/null || die "missing $t (apt-get install qemu-utils e2fsprogs restic borgbackup)"
done
[ -x /usr/bin/time ] || die "missing /usr/bin/time (apt-get install time)"

size_bytes=$(numfmt --from=iec "$SIZE") || die "SIZE=$SIZE: use a size like 512M or 4G"
mkdir -p "$WORK" "$OUTDIR"

log "building hyperkeep and the benchmark helpers (release)"
cargo build --release -q -p hyperkeep
cargo build --release -q -p repo --example bench_limit --example bench_write_changes
HK=$ROOT/target/release/hyperkeep
LIMIT=$ROOT/target/release/examples/bench_limit
WRITE_CHANGES=$ROOT/target/release/examples/bench_write_changes
for b in "$HK" "$LIMIT" "$WRITE_CHANGES"; do [ -x "$b" ] || die "cargo build did not produce $b"; done

# ---------------------------------------------------------------------------------------------
# Input images
BASE=$WORK/base-$SIZE.vhdx
CHANGED=$WORK/changed-$SIZE.vhdx
CHILD=$WORK/child-$SIZE.avhdx
CHANGES=$WORK/changes-$SIZE.txt
REWRITTEN=$WORK/rewritten-$SIZE.txt
if [ "${KEEP_INPUT:-0}" = 1 ] && [ -f "$BASE" ] && [ -f "$CHANGED" ] && [ -f "$CHILD" ] && [ -f "$CHANGES" ] && [ -f "$REWRITTEN" ]; then
    log "reusing the images in $WORK"
else
    budget=$((size_bytes * 45 / 100))
    staging=$WORK/staging
    rm -rf "$staging" "$BASE" "$CHANGED" "$CHILD" "$WORK/base.raw" "$WORK/changed.raw"
    mkdir -p "$staging"
    log "staging ~$((budget >> 20)) MiB of real files from /usr"
    stage_usr_files "$staging" "$budget"
    staged=$(du -sb "$staging" | cut -f1)
    log "staged $((staged >> 20)) MiB in $(find "$staging" -type f | wc -l) files; mke2fs (base)"
    mkfs_ext4 "$staging" "$WORK/base.raw" "$size_bytes"
    target=$((staged * CHANGE_PCT / 100))
    log "rewriting ~$((target >> 20)) MiB of files ($CHANGE_PCT %)"
    rewrite_files "$staging" "$target" >"$REWRITTEN"
    mkfs_ext4 "$staging" "$WORK/changed.raw" "$size_bytes"
    rm -rf "$staging"
    log "qemu-img convert -O vhdx -o subformat=dynamic (both images)"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$WORK/base.raw" "$BASE"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$WORK/changed.raw" "$CHANGED"
    log "differencing child of the base holding the changes"
    "$HK" disk create-child "$BASE" "$CHILD" >/dev/null
    "$WRITE_CHANGES" "$WORK/base.raw" "$WORK/changed.raw" "$CHILD" >"$CHANGES"
    rm -f "$WORK/base.raw" "$WORK/changed.raw"
fi
changed_bytes=$(cat "$CHANGES")
rewritten_bytes=$(cat "$REWRITTEN")

# ---------------------------------------------------------------------------------------------
# Runs
declare -A secs rss
timed() { # key command...   (stdout of the command goes to $WORK/last.out)
    local key=$1
    shift
    log "$key: $*"
    sync
    /usr/bin/time -f '%e %M' -o "$WORK/time" "$@" >"$WORK/last.out" 2>"$WORK/last.err" ||
        { cat "$WORK/last.err" >&2; die "$key failed: $*"; }
    read -r secs[$key] rss[$key] <"$WORK/time"
}
compare() { # what image
    qemu-img compare -q -f vhdx "$CHANGED" "$2" || die "$1: restored image differs from the changed image"
}

VM=$WORK/vm
RES=$WORK/restores
rm -rf "$VM" "$RES" "$WORK"/repo-*
mkdir -p "$VM" "$RES"

# The machine's limit first (it also brings the base image into the page cache for everyone).
timed limit "$LIMIT" "$BASE"
read -r limit_secs limit_read _ <"$WORK/last.out"
secs[limit]=$limit_secs
limit_runs=()
# The allocated data, as the disk's own allocation map says (what every backup must read).
alloc_bytes=$limit_read
log "base image: $((alloc_bytes >> 20)) MiB allocated; $((changed_bytes >> 20)) MiB changed"

# hyperkeep
export HYPERKEEP_REPOSITORY=$WORK/repo-hk HYPERKEEP_PASSWORD=bench-password
cp --sparse=always "$BASE" "$VM/disk.vhdx"
# The limit and the first backup, FIRST_RUNS times interleaved (each backup into a fresh
# repository), medians reported: their ratio is the goal, and on a machine that is not quite
# idle one run of each can be minutes apart in conditions.
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
first_runs=()
for ((r = 1; r <= FIRST_RUNS; r++)); do
    timed limit "$LIMIT" "$BASE"
    read -r limit_secs _ _ <"$WORK/last.out"
    limit_runs+=("$limit_secs")
    rm -rf "$HYPERKEEP_REPOSITORY"
    timed hk/init "$HK" init
    timed hk/first "$HK" --json backup --vm bench "$VM/disk.vhdx"
    first_runs+=("${secs[hk/first]}")
done
secs[limit]=$(median "${limit_runs[@]}")
secs[hk/first]=$(median "${first_runs[@]}")
log "limit runs: ${limit_runs[*]} s; first backup runs: ${first_runs[*]} s"
hk_first_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <"$WORK/last.out")
cp --sparse=always "$CHANGED" "$VM/disk.vhdx"
timed hk/second "$HK" --json backup --vm bench "$VM/disk.vhdx"
hk_second_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <"$WORK/last.out")
timed hk/changes "$HK" --json backup --vm bench --parent "$hk_first_id" --changes-from "$CHILD" "$CHILD"
hk_changes_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <"$WORK/last.out")
hk_changes_read=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["bytes_read"])' <"$WORK/last.out")
timed hk/restore "$HK" restore "$hk_second_id" --target "$RES/hk"
compare "hyperkeep (second backup)" "$RES/hk/disk.vhdx"
"$HK" restore "$hk_changes_id" --target "$RES/hk-changes" >/dev/null
# (the restored view is a whole disk, no longer a differencing one: restore names it .vhdx)
compare "hyperkeep (change-list backup)" "$RES/hk-changes/$(basename "$CHILD" .avhdx).vhdx"
rm -rf "$RES/hk" "$RES/hk-changes"
size_hk=$(du -sb "$HYPERKEEP_REPOSITORY" | cut -f1)

# restic
export RESTIC_REPOSITORY=$WORK/repo-restic RESTIC_PASSWORD=bench-password
timed restic/init restic init
cp --sparse=always "$BASE" "$VM/disk.vhdx"
timed restic/first restic backup "$VM/disk.vhdx"
cp --sparse=always "$CHANGED" "$VM/disk.vhdx"
timed restic/second restic backup "$VM/disk.vhdx"
timed restic/restore restic restore latest --target "$RES/restic"
compare restic "$RES/restic/$VM/disk.vhdx"
rm -rf "$RES/restic"
size_restic=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)

# borg (repokey-blake2: borg's fastest authenticated encryption; default lz4 compression)
export BORG_PASSPHRASE=bench-password BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
borg_rows=borg
[ "$BORG_FIXED" = 1 ] && borg_rows="borg borgfixed"
declare -A size_borg
for b in $borg_rows; do
    export BORG_REPO=$WORK/repo-$b
    chunker=()
    [ "$b" = borgfixed ] && chunker=(--chunker-params fixed,4194304)
    timed $b/init borg init -e repokey-blake2
    cp --sparse=always "$BASE" "$VM/disk.vhdx"
    timed $b/first borg create "${chunker[@]}" ::first "$VM/disk.vhdx"
    cp --sparse=always "$CHANGED" "$VM/disk.vhdx"
    timed $b/second borg create "${chunker[@]}" ::second "$VM/disk.vhdx"
    mkdir -p "$RES/$b"
    timed $b/restore bash -c "cd '$RES/$b' && borg extract ::second"
    compare "$b" "$RES/$b/${VM#/}/disk.vhdx"
    rm -rf "${RES:?}/$b"
    size_borg[$b]=$(du -sb "$BORG_REPO" | cut -f1)
done

# hyperkeep's memory on a large sparse disk: SPARSE_SIZE virtual, 16 x 16 MiB of data spread over it.
SPARSE=$WORK/sparse.vhdx
rm -f "$SPARSE"
qemu-img create -q -f vhdx -o subformat=dynamic "$SPARSE" "$SPARSE_SIZE"
sparse_bytes=$(numfmt --from=iec "$SPARSE_SIZE")
cmds=()
for i in $(seq 0 15); do cmds+=(-c "write -P $((i + 1)) $((sparse_bytes / 16 * i)) 16M"); done
qemu-io -f vhdx "${cmds[@]}" "$SPARSE" >/dev/null
export HYPERKEEP_REPOSITORY=$WORK/repo-sparse
"$HK" init >/dev/null
timed hk/sparse "$HK" backup --vm sparse "$SPARSE"
rm -f "$SPARSE" "$VM/disk.vhdx"

# ---------------------------------------------------------------------------------------------
# Report
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", b / 1048576 / s; else print "n/a" }'; }
peak() { # tool -> max RSS over its steps, MiB
    local m=0 k
    for k in "${!rss[@]}"; do
        case $k in "$1"/*) [ "$k" = hk/sparse ] || { [ "${rss[$k]}" -gt "$m" ] && m=${rss[$k]}; } ;; esac
    done
    awk -v k="$m" 'BEGIN { printf "%.0f", k / 1024 }'
}
cell() { [ -n "${secs[$1]:-}" ] && echo "${secs[$1]}" || echo "-"; }

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
fs=$(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')
stamp=$(date -u +%Y%m%dT%H%M%SZ)
report=$OUTDIR/backup-$SIZE-$stamp.md
cols=(hk restic $borg_rows)
declare -A colname=([hk]=hyperkeep [restic]=restic [borg]=borg [borgfixed]="borg fixed 4M")
{
    echo "### backup benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs ($cpu), $mem RAM, scratch filesystem $fs"
    echo "- hyperkeep $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)'), $(restic version | head -1 | cut -d' ' -f1-2), $(borg --version)"
    echo "- input: $SIZE dynamic VHDX (qemu-img), ext4 with real files from /usr: $(mib "$alloc_bytes") MiB allocated;" \
        "changed image: $(mib "$rewritten_bytes") MiB of files rewritten ($CHANGE_PCT % of the file data), $(mib "$changed_bytes") MiB of blocks differ"
    echo "- every tool at its defaults (hyperkeep: 1 MiB chunks, zstd 1, XAES-256-GCM; restic: CDC, zstd auto, AES-256;" \
        "borg: CDC, lz4, repokey-blake2$([ "$BORG_FIXED" = 1 ] && echo '; borg fixed: --chunker-params fixed,4194304'));" \
        "one run, except the limit and hyperkeep's first backup: $FIRST_RUNS interleaved runs each, median (runs: limit ${limit_runs[*]} s, first backup ${first_runs[*]} s); restores verified with qemu-img compare"
    echo
    printf '| step |'; for c in "${cols[@]}"; do printf ' %s |' "${colname[$c]}"; done; echo ' hyperkeep / restic | hyperkeep / borg |'
    printf '|---|'; for _ in "${cols[@]}"; do printf -- '---:|'; done; printf -- '---:|---:|\n'
    for step in first second changes restore; do
        case $step in
        first) label="first backup, s (MiB/s of allocated data)" ;;
        second) label="second backup (changed image), s" ;;
        changes) label="change-list incremental, s" ;;
        restore) label="restore of the second backup, s" ;;
        esac
        printf '| %s |' "$label"
        for c in "${cols[@]}"; do
            v=$(cell "$c/$step")
            if [ "$step" = first ] && [ "$v" != - ]; then v="$v ($(rate "$alloc_bytes" "$v"))"; fi
            printf ' %s |' "$v"
        done
        hv=$(cell "hk/$step")
        rv=$(cell "restic/$step")
        bv=$(cell "borg/$step")
        printf ' %s | %s |\n' "$([ "$rv" != - ] && [ "$hv" != - ] && ratio "$hv" "$rv" || echo -)" \
            "$([ "$bv" != - ] && [ "$hv" != - ] && ratio "$hv" "$bv" || echo -)"
    done
    printf '| repository size, MiB |'
    printf ' %s |' "$(mib "$size_hk")" "$(mib "$size_restic")"
    for b in $borg_rows; do printf ' %s |' "$(mib "${size_borg[$b]}")"; done
    printf ' %s | %s |\n' "$(ratio "$size_hk" "$size_restic")" "$(ratio "$size_hk" "${size_borg[borg]}")"
    printf '| peak RSS, MiB |'
    for c in "${cols[@]}"; do printf ' %s |' "$(peak "$c")"; done
    printf ' %s | %s |\n' "$(ratio "$(peak hk)" "$(peak restic)")" "$(ratio "$(peak hk)" "$(peak borg)")"
    echo
    echo "Ratios below 1.00: hyperkeep is faster or smaller."
    echo
    echo "Goals (issue 3):"
    echo "- first backup at least 3x restic's throughput: hyperkeep is $(ratio "${secs[restic/first]}" "${secs[hk/first]}")x restic."
    echo "- within 1.25x of this machine's limit (read $(mib "$limit_read") MiB allocated + BLAKE3 + zstd -1 on all cores: ${secs[limit]} s):" \
        "hyperkeep's first backup takes $(ratio "${secs[hk/first]}" "${secs[limit]}")x the limit."
    echo "- change-list incremental proportional to the changed data: it read $(mib "$hk_changes_read") MiB for" \
        "$(mib "$changed_bytes") MiB changed (the $(mib "$hk_changes_read") 1 MiB chunks those changed 4 KiB blocks fall in) and took ${secs[hk/changes]} s" \
        "($(ratio "${secs[hk/changes]}" "${secs[hk/first]}") of the first backup's time for" \
        "$(ratio "$changed_bytes" "$alloc_bytes") of its data)."
    echo "- peak memory under 256 MB backing up a $SPARSE_SIZE sparse VHDX (256 MiB of data):" \
        "$(awk -v k="${rss[hk/sparse]}" 'BEGIN { printf "%.0f", k / 1024 }') MiB in ${secs[hk/sparse]} s."
} | tee "$report"
log "report written to $report"
