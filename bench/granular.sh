#!/usr/bin/env bash
# Benchmark: granular restore. List a directory and extract one large file from a backed-up NTFS
# disk, straight from the repository, against the classic way: restore the whole disk, then read
# the file out of it with libguestfs.
#
# Input: a SIZE (default 4G) disk, GPT with one NTFS partition (mkntfs; filled through ntfs-3g)
# holding FILL (default 1200M) of real files copied from /usr, one FILE_SIZE (default 100M) file
# of realistic data (a tar stream of /usr/share and /usr/lib: text, binaries, already compressed
# parts) at /data/archive/big.tar, and free space; a dynamic VHDX made by qemu-img, backed up into
# a fresh repository.
#
# Measured, each on a cold cache for the files involved (the repository's and the outputs' pages
# are dropped with posix_fadvise(DONTNEED) before each step; DROP_CACHES=1 drops the whole page
# cache instead, which needs root and disturbs other work on the machine):
#   ls           hyperkeep ls SNAPSHOT /data/archive
#   cat          hyperkeep cat SNAPSHOT /data/archive/big.tar > file
#   include      hyperkeep restore SNAPSHOT --include /data/archive/big.tar --target DIR
#   full         hyperkeep restore SNAPSHOT --target DIR --to raw (the whole disk)
#   guestfish    guestfish --ro -a disk.raw -m /dev/sda1 download /data/archive/big.tar FILE
#                (LIBGUESTFS_BACKEND=direct, TCG forced: this machine has no KVM for it)
# Reported: wall seconds; bytes of pack data read from the repository (restore --include reports
# it itself; for the others: the bytes the process read through read(2) (rchar from
# /proc/self/io of the measuring parent, which the kernel adds a child's counts to when it is
# reaped), an upper bound that also counts the index and the manifests); peak RSS.
# Every extracted file is checked against the source by SHA-256.
#
# Usage: bench/granular.sh                      full run (4 GiB disk; the lead's run)
#        SIZE=512M FILL=150M FILE_SIZE=20M bench/granular.sh   quick check of the script
# Env: SIZE, FILL, FILE_SIZE, WORK (scratch, default bench/out/granular-work), KEEP_INPUT=1 (reuse
#      the disk and repository of the previous run), GUESTFISH=0 (skip the libguestfs row),
#      DROP_CACHES=1.
# Needs (Debian): ntfs-3g gdisk qemu-utils libguestfs-tools python3, and FUSE (/dev/fuse) for
# ntfs-3g.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SIZE=${SIZE:-4G}
FILL=${FILL:-1200M}
FILE_SIZE=${FILE_SIZE:-100M}
WORK=${WORK:-$ROOT/bench/out/granular-work}
GUESTFISH=${GUESTFISH:-1}
DROP_CACHES=${DROP_CACHES:-0}
OUTDIR=$ROOT/bench/out
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "bench/granular.sh: ERROR: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

for t in qemu-img sgdisk mkntfs ntfs-3g python3 sha256sum cargo fusermount; do
    command -v $t >/dev/null || die "missing $t (apt-get install qemu-utils gdisk ntfs-3g python3 fuse3)"
done
if [ "$GUESTFISH" = 1 ]; then
    command -v guestfish >/dev/null || die "missing guestfish (apt-get install libguestfs-tools), or run with GUESTFISH=0"
fi
[ -e /dev/fuse ] || die "/dev/fuse is missing: ntfs-3g needs FUSE to fill the NTFS volume"

size_bytes=$(numfmt --from=iec "$SIZE") || die "SIZE=$SIZE: use a size like 512M or 4G"
fill_bytes=$(numfmt --from=iec "$FILL") || die "FILL=$FILL: use a size like 150M"
file_bytes=$(numfmt --from=iec "$FILE_SIZE") || die "FILE_SIZE=$FILE_SIZE: use a size like 100M"
[ $((fill_bytes + file_bytes)) -lt $((size_bytes * 8 / 10)) ] ||
    die "FILL + FILE_SIZE must stay under 80% of SIZE (free space is part of the test)"
mkdir -p "$WORK" "$OUTDIR"

log "building hyperkeep (release)"
cargo build --release -q -p hyperkeep
HK=$ROOT/target/release/hyperkeep
[ -x "$HK" ] || die "cargo build did not produce $HK"

REPO=$WORK/repo
export HYPERKEEP_REPOSITORY=$REPO HYPERKEEP_PASSWORD=granular-bench
unset HYPERKEEP_PASSWORD_FILE HYPERKEEP_LOG || true
GUEST_DIR=/data/archive
GUEST_FILE=$GUEST_DIR/big.tar

# --- measuring helper -----------------------------------------------------------------------
cat > "$WORK/measure.py" <<'EOF'
# measure.py LABEL OUTFILE|- CMD...: run CMD (stdout to OUTFILE, or to measure's stdout with -),
# print one JSON line: wall seconds, rchar/read_bytes of the child (added to our own /proc/self/io
# when it is reaped), peak RSS of the child.
import json, os, resource, subprocess, sys, time
def io():
    d = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            d[k] = int(v)
    return d
label, out, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
before = io()
t0 = time.monotonic()
stdout = open(out, "wb") if out != "-" else subprocess.PIPE
p = subprocess.run(cmd, stdout=stdout)
wall = time.monotonic() - t0
after = io()
if p.returncode != 0:
    sys.exit(f"{label}: {' '.join(cmd)} exited with {p.returncode}")
res = {"label": label, "seconds": round(wall, 3),
       "rchar": after["rchar"] - before["rchar"],
       "read_bytes": after["read_bytes"] - before["read_bytes"],
       "max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
if out == "-":
    res["stdout"] = p.stdout.decode("utf-8", "replace")
print(json.dumps(res))
EOF
cat > "$WORK/evict.py" <<'EOF'
# evict.py PATH...: drop the page cache of every file below PATH (posix_fadvise DONTNEED), so the
# next read comes from the disk, without disturbing the rest of the machine.
import os, sys
for top in sys.argv[1:]:
    for dirpath, _, files in os.walk(top):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages are not dropped: write them back first
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
EOF
cold() {
    if [ "$DROP_CACHES" = 1 ]; then
        sync
        echo 3 > /proc/sys/vm/drop_caches
    else
        python3 "$WORK/evict.py" "$@"
    fi
}
measure() { python3 "$WORK/measure.py" "$@"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# --- input ----------------------------------------------------------------------------------
DISK_RAW=$WORK/disk.raw
DISK_VHDX=$WORK/vm/bench-ntfs.vhdx
if [ "${KEEP_INPUT:-0}" = 1 ] && [ -f "$DISK_VHDX" ] && [ -f "$WORK/big.sha256" ] && [ -d "$REPO" ]; then
    log "reusing $DISK_VHDX and $REPO"
else
    rm -rf "$WORK/vm" "$REPO" "$DISK_RAW" "$WORK/part.img" "$WORK/mnt"
    mkdir -p "$WORK/vm" "$WORK/mnt"
    part_start=$((1 << 20))
    # GPT keeps 33 sectors for its backup at the end; end the partition on a MiB boundary.
    part_len=$(( (size_bytes - part_start - (1 << 20)) ))
    log "NTFS volume of $(numfmt --to=iec $part_len) (mkntfs), filled through ntfs-3g"
    truncate -s "$part_len" "$WORK/part.img"
    mkntfs -q -F -f -L BENCH -c 4096 -p 2048 -H 255 -S 63 "$WORK/part.img"
    ntfs-3g -o big_writes "$WORK/part.img" "$WORK/mnt"
    trap 'fusermount -u "$WORK/mnt" 2>/dev/null || true' EXIT
    mkdir -p "$WORK/mnt$GUEST_DIR" "$WORK/mnt/usr"
    # Real files from /usr until FILL bytes: regular files under 64 MiB, sorted by path for a
    # repeatable tree.
    python3 - "$fill_bytes" "$WORK/mnt/usr" <<'EOF'
import os, shutil, sys
budget, dest = int(sys.argv[1]), sys.argv[2]
done = 0
for top in ["/usr/share", "/usr/lib", "/usr/bin", "/usr/include", "/usr/libexec", "/usr/sbin"]:
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            src = os.path.join(dirpath, name)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if not os.path.isfile(src) or os.path.islink(src) or st.st_size > 64 << 20:
                continue
            dst = dest + src[len("/usr"):]
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                shutil.copy2(src, dst)
            except OSError:
                continue
            done += st.st_size
            if done >= budget:
                print(f"copied {done} bytes of /usr files", file=sys.stderr)
                sys.exit(0)
print(f"copied {done} bytes of /usr files (all there were)", file=sys.stderr)
EOF
    # The large file: a tar stream of real files (mixed compressibility), cut to FILE_SIZE.
    (tar -C / -cf - usr/share usr/lib 2>/dev/null || true) | head -c "$file_bytes" > "$WORK/big.src"
    [ "$(stat -c %s "$WORK/big.src")" = "$file_bytes" ] || die "could not make a $FILE_SIZE file from /usr"
    cp "$WORK/big.src" "$WORK/mnt$GUEST_FILE"
    sha256sum < "$WORK/big.src" | cut -d' ' -f1 > "$WORK/big.sha256"
    rm -f "$WORK/big.src"
    for i in $(seq 1 20); do echo "note $i" > "$WORK/mnt$GUEST_DIR/note-$i.txt"; done
    fusermount -u "$WORK/mnt"
    trap - EXIT
    log "GPT disk of $SIZE, NTFS partition 1, as a dynamic VHDX"
    truncate -s "$size_bytes" "$DISK_RAW"
    sgdisk -o -n "1:$((part_start / 512)):+$((part_len / 512))" -t 1:0700 "$DISK_RAW" >/dev/null
    dd if="$WORK/part.img" of="$DISK_RAW" bs=1M seek=1 conv=notrunc,sparse status=none
    rm -f "$WORK/part.img"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$DISK_RAW" "$DISK_VHDX"
    rm -f "$DISK_RAW"
    log "backing up into a fresh repository"
    "$HK" init >/dev/null
    "$HK" backup --vm bench "$DISK_VHDX" >/dev/null
fi
want=$(cat "$WORK/big.sha256")
check_sha() { [ "$(sha256sum < "$1" | cut -d' ' -f1)" = "$want" ] || die "$2: extracted file differs from the source"; }

# --- measurements ---------------------------------------------------------------------------
rm -rf "$WORK/out-include" "$WORK/out-full" "$WORK/out-cat" "$WORK/out-gf"
results=()

cold "$REPO"
log "ls $GUEST_DIR"
r=$(measure ls - "$HK" ls latest "$GUEST_DIR")
case "$(field "$r" stdout)" in *big.tar*) ;; *) die "ls did not list big.tar: $(field "$r" stdout)";; esac
results+=("$r")

cold "$REPO"
log "cat $GUEST_FILE"
r=$(measure cat "$WORK/out-cat" "$HK" cat latest "$GUEST_FILE")
check_sha "$WORK/out-cat" cat
results+=("$r")
rm -f "$WORK/out-cat"

cold "$REPO"
log "restore --include $GUEST_FILE"
r=$(measure include - "$HK" --json restore latest --include "$GUEST_FILE" --target "$WORK/out-include")
check_sha "$WORK/out-include$GUEST_FILE" "restore --include"  # the guest path is kept below DIR
include_repo_bytes=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(json.loads(r["stdout"]).get("repository_bytes_read") or 0)' "$r")
results+=("$r")
rm -rf "$WORK/out-include"

cold "$REPO"
log "full restore (raw)"
r=$(measure full - "$HK" restore latest --target "$WORK/out-full" --to raw)
results+=("$r")
full_raw=$(ls "$WORK/out-full"/*.raw)

if [ "$GUESTFISH" = 1 ]; then
    # The first libguestfs run builds its appliance (cached in /var/tmp/.guestfs-$UID); build it
    # outside the measurement so the row shows the steady state.
    LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg guestfish -a /dev/null run ||
        die "guestfish cannot start its appliance (run libguestfs-test-tool; it needs a kernel: apt-get install linux-image-amd64)"
    cold "$WORK/out-full"
    log "guestfish download (direct backend, TCG)"
    r=$(LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg \
        measure guestfish - guestfish --ro -a "$full_raw" -m /dev/sda1 download "$GUEST_FILE" "$WORK/out-gf")
    check_sha "$WORK/out-gf" guestfish
    results+=("$r")
    rm -f "$WORK/out-gf"
fi
rm -rf "$WORK/out-full"

# --- report ---------------------------------------------------------------------------------
stamp=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=$OUTDIR/granular-$SIZE-$stamp.md
printf '%s\n' "${results[@]}" > "$OUTDIR/granular-$SIZE-$stamp.jsonl"
{
    echo "Granular restore benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/Mem:/{print $2}') GiB RAM; $("$HK" --version); $(guestfish --version 2>/dev/null || echo 'guestfish not run')"
    echo
} > "$REPORT"
python3 - "$OUTDIR/granular-$SIZE-$stamp.jsonl" "$file_bytes" "$include_repo_bytes" "$SIZE" "$FILL" "$FILE_SIZE" >> "$REPORT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
file_bytes, include_repo = int(sys.argv[2]), int(sys.argv[3])
size, fill, fsize = sys.argv[4:7]
by = {r["label"]: r for r in rows}
names = {
    "ls": "`hyperkeep ls` of the directory",
    "cat": "`hyperkeep cat` of the file",
    "include": "`hyperkeep restore --include` of the file",
    "full": "`hyperkeep restore` of the whole disk (raw)",
    "guestfish": "then `guestfish download` from the restored disk",
}
mib = lambda b: f"{b / 2**20:,.1f} MiB"
print(f"Disk {size} (GPT, NTFS, {fill} of /usr files, free space), file {fsize} ({file_bytes} bytes).\n")
print("| step | wall | read by the process (rchar) | pack bytes from the repository | peak RSS |")
print("|---|---:|---:|---:|---:|")
for k in ["ls", "cat", "include", "full", "guestfish"]:
    if k not in by:
        continue
    r = by[k]
    pack = mib(include_repo) + f" ({100 * include_repo / file_bytes:.1f}% of the file)" if k == "include" else ""
    print(f"| {names[k]} | {r['seconds']:.2f} s | {mib(r['rchar'])} | {pack} | {r['max_rss_kib'] // 1024} MiB |")
if "full" in by:
    classic = by["full"]["seconds"] + by.get("guestfish", {"seconds": 0})["seconds"]
    g = by["include"]["seconds"]
    print(f"\nWhole-disk restore + guestfish: {classic:.2f} s; `restore --include`: {g:.2f} s "
          f"({classic / g:.0f}× faster). Goal: under 1 s and under 110% of the file read from the "
          f"repository: {'met' if g < 1 and include_repo < 1.1 * file_bytes else 'NOT met'}.")
EOF
cat "$REPORT"
log "results: $REPORT (raw measurements beside it, .jsonl)"
