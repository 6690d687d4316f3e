#!/usr/bin/env bash
# Benchmark: `hyperkeep disk convert` against `qemu-img convert`, in one run, on the same input.
#
# Input: a SIZE (default 4G) disk holding an ext4 filesystem filled to ~45% with real files
# copied from /usr (libraries, binaries, documentation: incompressible and compressible data,
# many small files and some big ones), plus free space, converted by qemu-img to a dynamic VHDX
# with qemu's defaults (8 MiB blocks; qemu marks never-written blocks ZERO).
#
# Cases, each run RUNS times (default 3), interleaved, median reported:
#   to raw:  hyperkeep disk convert IN out.raw --to raw    vs  qemu-img convert -O raw
#   to vhdx: hyperkeep disk convert IN out.vhdx --to vhdx  vs  qemu-img convert -O vhdx -o subformat=dynamic
# Both tools make their output durable before they exit: hyperkeep always fsyncs; qemu-img's
# default output cache mode (unsafe) skips the flush, so it runs with -t writeback, which flushes
# on close. Comparing a durable write with one still in the page cache would measure nothing.
# Measured with /usr/bin/time: wall seconds and peak RSS. Every output is verified against the
# input with `qemu-img compare`. The report (markdown) goes to stdout and bench/out/.
#
# Usage: bench/convert.sh            full run (4 GiB disk, ~1.8 GiB of files)
#        SIZE=512M bench/convert.sh  quick check
# Env: SIZE (qemu-img size syntax: 512M, 4G), RUNS, WORK (scratch dir, default bench/out/work;
#      needs ~3x SIZE of free space), KEEP_INPUT=1 reuses an input built earlier for this SIZE.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SIZE=${SIZE:-4G}
RUNS=${RUNS:-3}
WORK=${WORK:-$ROOT/bench/out/work}
OUTDIR=$ROOT/bench/out
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "bench/convert.sh: ERROR: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

for t in qemu-img mke2fs cargo; do command -v $t >/dev/null || die "missing $t (run scripts/test.sh, which installs everything)"; done
[ -x /usr/bin/time ] || die "missing /usr/bin/time (apt-get install time)"

size_bytes=$(numfmt --from=iec "$SIZE") || die "SIZE=$SIZE: use a size like 512M or 4G"
mkdir -p "$WORK" "$OUTDIR"

log "building hyperkeep (release)"
cargo build --release -q -p hyperkeep
HK=$ROOT/target/release/hyperkeep
[ -x "$HK" ] || die "cargo build did not produce $HK"

# ---------------------------------------------------------------------------------------------
# Input
IN=$WORK/input-$SIZE.vhdx
if [ "${KEEP_INPUT:-0}" = 1 ] && [ -f "$IN" ]; then
    log "reusing $IN"
else
    budget=$((size_bytes * 45 / 100))
    staging=$WORK/staging
    rm -rf "$staging" "$IN" "$WORK/input.raw"
    mkdir -p "$staging"
    log "staging ~$((budget >> 20)) MiB of real files from /usr"
    # Regular files only, in a stable order, until the budget is used; tar recreates the
    # directory structure. (Files under 64 MiB: a few huge blobs would make it less realistic.)
    # (awk stops reading at the budget, so find and sort die of SIGPIPE: not an error here.)
    set +o pipefail
    # Binaries, headers, documentation and data first, then libraries fill the budget.
    for d in /usr/bin /usr/include /usr/libexec /usr/share /usr/lib; do
        find "$d" -xdev -type f -size -64M -printf '%p\t%s\0' 2>/dev/null | sort -z
    done |
        awk -v RS='\0' -v ORS='\0' -v budget="$budget" -F'\t' \
            '{ total += $2; if (total > budget) exit; print $1 }' |
        tar --null --no-recursion -T - -cf - 2>/dev/null | tar -xf - -C "$staging"
    set -o pipefail
    staged=$(du -sb "$staging" | cut -f1)
    log "staged $((staged >> 20)) MiB in $(find "$staging" -type f | wc -l) files"
    log "mke2fs -t ext4 -d (a $SIZE filesystem)"
    mke2fs -q -F -t ext4 -d "$staging" "$WORK/input.raw" "$((size_bytes / 1024))k" >&2
    log "qemu-img convert -O vhdx -o subformat=dynamic (8 MiB blocks, qemu's default)"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$WORK/input.raw" "$IN"
    rm -rf "$staging" "$WORK/input.raw"
fi
in_alloc=$(du -k "$IN" | cut -f1)

# ---------------------------------------------------------------------------------------------
# Runs: CASE KIND -> command line; KIND is hk or qemu.
cmd_for() { # case tool out
    case "$1/$2" in
    raw/hk) echo "$HK disk convert $IN $3 --to raw" ;;
    raw/qemu) echo "qemu-img convert -t writeback -f vhdx -O raw $IN $3" ;;
    vhdx/hk) echo "$HK disk convert $IN $3 --to vhdx" ;;
    vhdx/qemu) echo "qemu-img convert -t writeback -f vhdx -O vhdx -o subformat=dynamic $IN $3" ;;
    esac
}

declare -A secs rss outsize
for run in $(seq 1 "$RUNS"); do
    for c in raw vhdx; do
        for tool in hk qemu; do
            out=$WORK/out-$tool.$c
            rm -f "$out"
            sync
            log "run $run/$RUNS: $c $tool"
            # shellcheck disable=SC2046
            /usr/bin/time -f '%e %M' -o "$WORK/time" $(cmd_for $c $tool "$out") >/dev/null 2>"$WORK/stderr" ||
                { cat "$WORK/stderr" >&2; die "$(cmd_for $c $tool "$out") failed"; }
            read -r s m <"$WORK/time"
            secs[$c/$tool]+="$s "
            rss[$c/$tool]+="$m "
            if [ "$run" = "$RUNS" ]; then
                # Identical guest content, whatever the format.
                qemu-img compare -q -f vhdx -F "$c" "$IN" "$out" ||
                    die "$c output of $tool differs from the input (qemu-img compare)"
                outsize[$c/$tool]=$(du -k "$out" | cut -f1)
            fi
            rm -f "$out"
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# ---------------------------------------------------------------------------------------------
# Report
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
fs=$(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')
stamp=$(date -u +%Y%m%dT%H%M%SZ)
report=$OUTDIR/convert-$SIZE-$stamp.md
{
    echo "### convert benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs ($cpu), $mem RAM, scratch filesystem $fs"
    echo "- hyperkeep $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)'), $(qemu-img --version | head -1)"
    echo "- input: $SIZE dynamic VHDX (qemu-img, 8 MiB blocks), ext4 with real files from /usr; file $((in_alloc / 1024)) MiB allocated"
    echo "- each case $RUNS runs, interleaved; median shown; outputs verified with qemu-img compare"
    echo
    echo "| case | hyperkeep s | qemu-img s | time ratio | hyperkeep peak RSS MiB | qemu-img peak RSS MiB | RSS ratio | output MiB (hk / qemu) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for c in raw vhdx; do
        hs=$(echo "${secs[$c/hk]}" | median)
        qs=$(echo "${secs[$c/qemu]}" | median)
        hm=$(echo "${rss[$c/hk]}" | median)
        qm=$(echo "${rss[$c/qemu]}" | median)
        printf '| vhdx -> %s | %s | %s | %s | %.1f | %.1f | %s | %d / %d |\n' \
            "$c" "$hs" "$qs" "$(ratio "$hs" "$qs")" \
            "$(awk -v k="$hm" 'BEGIN { print k / 1024 }')" "$(awk -v k="$qm" 'BEGIN { print k / 1024 }')" \
            "$(ratio "$hm" "$qm")" "$((outsize[$c/hk] / 1024))" "$((outsize[$c/qemu] / 1024))"
    done
    echo
    echo "Ratios are hyperkeep / qemu-img: below 1.00 means hyperkeep is faster or smaller."
    echo "All runs (s): $(for k in raw/hk raw/qemu vhdx/hk vhdx/qemu; do printf '%s: %s; ' "$k" "${secs[$k]% }"; done)"
} | tee "$report"
log "report written to $report"
