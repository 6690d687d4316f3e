#!/usr/bin/env bash
# Run every hyperkeep test: the one command for developers and CI (.ci/run calls it).
#
# On a fresh Debian 12 machine, as root, without prompts, it first installs what the tests need
# (apt packages, the libvhdi Python wheel, cargo-fuzz), and only what is missing: a second run
# installs nothing and goes straight to the tests. Then:
#   1. cargo test over the whole workspace (unit, integration and interop tests against qemu-img,
#      qemu-io and libvhdi; they fail loudly if a tool is missing);
#   2. the fuzz crate's own tests;
#   3. each cargo-fuzz target for FUZZ_SECONDS (default 60), starting from the committed seed
#      corpus and the inputs that once crashed it (fuzz/regressions/<target>); any crash,
#      timeout or out-of-memory fails the run.
#
# Environment knobs:
#   FUZZ_SECONDS=N   seconds per fuzz target (default 60; 0 skips fuzzing: local use only)
#   TEST_RUNNER=cargo|nextest   force the test runner (default: nextest if installed)
#   ONLY=setup|workspace|fuzz   run the setup plus only that part (local use; CI runs all)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TARGETS=(vhdx_open vhd_open guestfs_open partitions repository)
ONLY=${ONLY:-}
START=$SECONDS

section() { printf '\n\033[1m==== %s  (t+%ds) ====\033[0m\n' "$*" "$((SECONDS - START))"; }
die() {
    printf '\n\033[1;31mtest.sh: ERROR: %s\033[0m\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root to run: $* (run this script as root, or install those packages first)"
    fi
}

# ---------------------------------------------------------------------------------------------
section "Setup: system packages"
# qemu-utils: the qemu-img/qemu-io oracles; e2fsprogs fdisk gdisk mtools dosfstools ntfs-3g
# exfatprogs exfat-fuse attr fuse3: building guest filesystem images and the FUSE mount tests;
# sleuthkit: the independent filesystem oracle; restic: forget-policy comparison.
APT_PACKAGES=(qemu-utils e2fsprogs fdisk gdisk mtools dosfstools ntfs-3g exfatprogs exfat-fuse
    attr fuse3 util-linux sleuthkit restic time python3 python3-pip)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "all present: ${APT_PACKAGES[*]}"
fi

# ---------------------------------------------------------------------------------------------
section "Setup: Python (libvhdi, the independent VHD/VHDX reader the interop tests compare with)"
command -v python3 >/dev/null || die "python3 is missing after the apt step"
if python3 -c 'import pyvhdi' 2>/dev/null; then
    echo "pyvhdi present: $(python3 -c 'import pyvhdi; print(pyvhdi.get_version())')"
else
    pip_install=(python3 -m pip install --no-input --disable-pip-version-check --root-user-action=ignore libvhdi-python)
    # Debian's own python3 is "externally managed" (PEP 668): pip refuses unless told to.
    if ! "${pip_install[@]}"; then
        echo "retrying with --break-system-packages"
        "${pip_install[@]}" --break-system-packages
    fi
    python3 -c 'import pyvhdi' || die "pip installed libvhdi-python but 'import pyvhdi' still fails"
fi

if python3 -c 'import pyfsntfs' 2>/dev/null; then
    echo "pyfsntfs present (libfsntfs, the independent NTFS oracle)"
else
    pip_install=(python3 -m pip install --no-input --disable-pip-version-check --root-user-action=ignore libfsntfs-python)
    if ! "${pip_install[@]}"; then
        "${pip_install[@]}" --break-system-packages
    fi
    python3 -c 'import pyfsntfs' || die "pip installed libfsntfs-python but 'import pyfsntfs' still fails"
fi

# ---------------------------------------------------------------------------------------------
section "Setup: cargo tools"
command -v cargo >/dev/null || die "cargo is not installed (install Rust with rustup first)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz install did not produce a working 'cargo fuzz'"

# ---------------------------------------------------------------------------------------------
section "Setup: the QEMU test VM (qemu-system-x86, kernel, busybox initramfs, guest agent)"
# Built here, once, before the tests: the VM tests run in parallel and must not race on apt.
as_root bash testvm/build.sh >/dev/null || die "testvm/build.sh failed (see its output above)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after testvm/build.sh"

# ---------------------------------------------------------------------------------------------
section "Check: every tool the tests use is present"
for tool in qemu-img qemu-io mke2fs sfdisk sgdisk mcopy mkfs.vfat mkntfs ntfs-3g mkfs.exfat \
    fusermount3 setfattr fls icat restic python3 cargo rustc; do
    command -v "$tool" >/dev/null || die "'$tool' not found in PATH after the install steps"
done
[ -x /usr/bin/time ] || die "/usr/bin/time not found after installing package 'time'"
printf '%-10s %s\n' \
    rustc "$(rustc --version)" \
    cargo-fuzz "$(cargo fuzz --version)" \
    qemu-img "$(qemu-img --version | head -1)" \
    python3 "$(python3 --version 2>&1)" \
    pyvhdi "$(python3 -c 'import pyvhdi; print(pyvhdi.get_version())')"

# ---------------------------------------------------------------------------------------------
# Each part runs even if an earlier one failed, so one CI run shows every failure; the script
# fails at the end if any part did.
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
FAILED=()
step() { # NAME COMMAND...: run, remember a failure, go on
    local name=$1
    shift
    if ! "$@"; then
        printf '\033[1;31m---- FAILED: %s\033[0m\n' "$name"
        FAILED+=("$name")
    fi
}

if want workspace; then
    runner=${TEST_RUNNER:-}
    if [ -z "$runner" ]; then
        if cargo nextest --version >/dev/null 2>&1; then runner=nextest; else runner=cargo; fi
    fi
    section "Tests: workspace ($runner)"
    # A hung test must not eat CI's 90 minutes: nextest ends any test still running after
    # 10 minutes (as a tool config, so a repository .config/nextest.toml still wins), and the
    # whole step has an outer limit for either runner.
    nextest_cfg=$(mktemp --suffix=.toml)
    printf '[profile.default]\nslow-timeout = { period = "60s", terminate-after = 10 }\n' >"$nextest_cfg"
    case "$runner" in
    nextest) step "workspace tests" timeout 45m cargo nextest run --workspace --all-targets \
        --no-fail-fast --tool-config-file "hyperkeep-test-sh:$nextest_cfg" ;;
    cargo) step "workspace tests" timeout 45m cargo test --workspace --all-targets --no-fail-fast ;;
    *) die "TEST_RUNNER must be 'cargo' or 'nextest', not '$runner'" ;;
    esac
    section "Tests: doctests"
    # --all-targets leaves doctests out (and nextest cannot run them).
    step "doctests" timeout 15m cargo test --workspace --doc --no-fail-fast
    rm -f "$nextest_cfg"
fi

fuzz_target() { # TARGET: run one cargo-fuzz target for FUZZ_SECONDS from the committed seeds
    local t=$1 seeds="fuzz/corpus/$1" scratch log
    [ -n "$(ls -A "$seeds" 2>/dev/null)" ] || {
        echo "seed corpus $seeds is empty (run fuzz/make-corpus.sh)"
        return 1
    }
    # New inputs go to a scratch directory (the first corpus argument) so the committed seed
    # corpus stays as committed. libFuzzer prints a line per new input: that goes to a log; we
    # show the summary, or on failure the end of the log with the crash report.
    scratch=$(mktemp -d)
    log=$scratch.log
    # Inputs that once crashed the target start every run too (fuzz/README.md, Regressions).
    local extra=()
    [ -d "fuzz/regressions/$t" ] && extra=("fuzz/regressions/$t")
    if cargo fuzz run --fuzz-dir fuzz "$t" "$scratch" "$seeds" "${extra[@]}" -- \
        -max_total_time="$FUZZ_SECONDS" -max_len=262144 -timeout=30 \
        -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 </dev/null >"$log" 2>&1; then
        grep -E '^(INFO: seed corpus|#[0-9]+[[:space:]]+(INITED|DONE)|Done |stat::)' "$log" || true
        echo "$t: no crash in ${FUZZ_SECONDS}s ($(ls "$scratch" | wc -l) new corpus entries)"
        rm -rf "$scratch" "$log"
    else
        tail -n 80 "$log"
        echo "$t: FAILED. Reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t fuzz/artifacts/$t/<file>"
        echo "  the file it describes: cargo run --manifest-path fuzz/Cargo.toml --bin encode_corpus decode fuzz/artifacts/$t/<file> /tmp/disk"
        ls -l "fuzz/artifacts/$t" 2>/dev/null || true
        rm -rf "$scratch" "$log"
        return 1
    fi
}

if want fuzz; then
    section "Tests: fuzz crate (input encoding, seeds open, contract checks)"
    step "fuzz crate tests" cargo test --manifest-path fuzz/Cargo.toml --lib
    if [ "$FUZZ_SECONDS" -gt 0 ]; then
        # cargo-fuzz builds with -Zsanitizer=address, a nightly-only flag. The machine has only
        # the stable toolchain, and RUSTC_BOOTSTRAP=1 lets stable accept it (fuzz/README.md).
        export RUSTC_BOOTSTRAP=1
        section "Fuzz: build (${FUZZ_TARGETS[*]}; AddressSanitizer)"
        if cargo fuzz build --fuzz-dir fuzz; then
            for t in "${FUZZ_TARGETS[@]}"; do
                section "Fuzz: $t for ${FUZZ_SECONDS}s"
                step "fuzz $t" fuzz_target "$t"
            done
        else
            FAILED+=("fuzz build")
        fi
    else
        section "Fuzz: skipped (FUZZ_SECONDS=0)"
    fi
fi

if [ ${#FAILED[@]} -gt 0 ]; then
    die "failed after $((SECONDS - START))s: ${FAILED[*]}"
fi
section "All tests passed in $((SECONDS - START))s"
