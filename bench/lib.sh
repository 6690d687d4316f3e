# Shared by bench/backup.sh and bench/replicate.sh (sourced): building "a VM disk with real files"
# and "the same VM with some of its files changed", reproducibly.

# Fixed identity and clock: mke2fs then lays out the same tree identically twice, so the base
# and the changed image differ only in the rewritten files' blocks (and their inodes).
FS_UUID=6f1e4c2a-5b3d-4e8f-9a7c-0d2b4e6f8a1c
export E2FSPROGS_FAKE_TIME=1700000000

# mkfs_ext4 STAGING OUT.raw SIZE_BYTES: an ext4 image holding the STAGING tree.
mkfs_ext4() {
    mke2fs -q -F -t ext4 -U "$FS_UUID" -E hash_seed="$FS_UUID" -d "$1" "$2" "$(($3 / 1024))k" >&2
}

# stage_usr_files STAGING BUDGET_BYTES: copy real files from /usr (binaries, libraries,
# documentation, locales: compressible and incompressible, small and large) into STAGING, in a
# fixed order, until BUDGET_BYTES.
stage_usr_files() {
    set +o pipefail # awk stops at the budget; find, sort and tar then die of SIGPIPE
    find /usr/bin /usr/lib /usr/share /usr/libexec /usr/include -xdev -type f -size -64M \
        -printf '%p\t%s\0' 2>/dev/null |
        sort -z |
        awk -v RS='\0' -v ORS='\0' -v budget="$2" -F'\t' \
            '{ total += $2; if (total > budget) exit; print $1 }' |
        tar --null --no-recursion -T - -cf - 2>/dev/null | tar -xf - -C "$1"
    set -o pipefail
}

# rewrite_files STAGING TARGET_BYTES: rewrite files in place (same size, same inode, new random
# content), in a fixed pseudo-random order spread over the tree, until TARGET_BYTES are new;
# prints the bytes rewritten. Only files without an all-zero 1 KiB block (the smallest ext4
# block): mke2fs -d leaves those out as holes, so filling them would allocate more blocks and
# shift the layout of every later file. No new directory entries either, not even temporary
# ones: they can change a directory's readdir order and so mke2fs's order.
rewrite_files() {
    python3 - "$1" "$2" <<'PY'
import hashlib, os, sys
root, target = sys.argv[1], int(sys.argv[2])
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
files = [f for f in files if os.path.isfile(f) and not os.path.islink(f)]
files.sort(key=lambda f: hashlib.sha256(f.encode()).digest())
done, zero = 0, bytes(1024)
for f in files:
    if done >= target:
        break
    data = open(f, "rb").read()
    if not data or any(data[o:o + 1024] == zero[:len(data[o:o + 1024])] for o in range(0, len(data), 1024)):
        continue
    with open(f, "r+b") as out:
        out.write(os.urandom(len(data)))
    done += len(data)
print(done)
PY
}
