#!/usr/bin/env bash
# Regenerate the committed seed corpus of the guest-filesystem targets (fuzz/corpus/guestfs_open/
# and fuzz/corpus/partitions/) from real images made by the filesystems' own mkfs tools, encoded
# by `encode_corpus` (see src/lib.rs for the encoding: only non-zero bytes cost space, so a
# mostly empty 34 MiB FAT32 encodes in a few KiB).
#
# Needs (Debian): dosfstools mtools e2fsprogs exfatprogs ntfs-3g gdisk fdisk attr; exfat-fuse
# and ntfs-3g mounts (FUSE, root) put files into the exFAT and NTFS images when /dev/fuse works;
# without them those two seeds hold an empty root (the script says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
for t in mkfs.fat mcopy mmd mke2fs mkfs.exfat mkntfs ntfscp sgdisk sfdisk; do
    command -v $t >/dev/null || {
        echo "missing $t (apt-get install dosfstools mtools e2fsprogs exfatprogs ntfs-3g gdisk fdisk)" >&2
        exit 1
    }
done
cargo build -q --bin encode_corpus
ENC=$(pwd)/target/debug/encode_corpus
work=$(mktemp -d)
mnt=$work/mnt
mkdir -p "$mnt"
trap 'umount "$mnt" 2>/dev/null || true; rm -rf "$work"' EXIT

seed() { # TARGET NAME FILE
    mkdir -p "corpus/$1"
    "$ENC" encode "$3" "corpus/$1/$2" 2>/dev/null
    printf '  %-14s %-28s %7d bytes\n' "$1" "$2" "$(stat -c %s "corpus/$1/$2")"
}

# A tiny tree: long and non-ASCII names, a subdirectory two deep, a file with a hole, a file
# bigger than one cluster/block, symlinks (fast and slow), a hard link, an extended attribute.
tree=$work/tree
mkdir -p "$tree/Sub Directory/deeper"
printf 'hello guest\n' >"$tree/hello.txt"
printf 'a file with a rather long name\n' >"$tree/A rather long file name, with spaces.text"
printf 'caf\xc3\xa9\n' >"$tree/caf$(printf '\xc3\xa9').txt"
seq 1 3000 >"$tree/Sub Directory/numbers.txt" # ~14 KiB: several clusters
printf 'deep\n' >"$tree/Sub Directory/deeper/leaf"
printf 'start' >"$tree/holey"
printf 'end' | dd of="$tree/holey" bs=1 seek=200000 conv=notrunc status=none
ln -s hello.txt "$tree/short-link"
ln -s "Sub Directory/deeper/leaf/../../../a/target/path/longer/than/sixty/characters/so/it/needs/a/block" "$tree/long-link"
ln "$tree/hello.txt" "$tree/hard-link"
setfattr -n user.comment -v 'an extended attribute' "$tree/hello.txt" 2>/dev/null ||
    echo "  (the scratch filesystem has no user xattrs: the ext seeds have none)"

# FAT: mtools copies the tree (no links).
fat_fill() { # IMAGE
    mmd -i "$1" "::/Sub Directory" "::/Sub Directory/deeper"
    mcopy -i "$1" "$tree/hello.txt" "$tree/A rather long file name, with spaces.text" "$tree/holey" ::/
    mcopy -i "$1" "$tree/Sub Directory/numbers.txt" "::/Sub Directory/"
    mcopy -i "$1" "$tree/Sub Directory/deeper/leaf" "::/Sub Directory/deeper/"
}
f=$work/fat12.img
mkfs.fat -C -F 12 -n FAT12SEED "$f" 1024 >/dev/null
fat_fill "$f"
seed guestfs_open fat12 "$f"
seed partitions bare-fat12 "$f"
f=$work/fat16.img
mkfs.fat -C -F 16 -s 1 -n FAT16SEED "$f" $((8 * 1024)) >/dev/null
fat_fill "$f"
seed guestfs_open fat16 "$f"
# FAT32 needs at least 65525 clusters: 512-byte clusters on 34 MiB.
f=$work/fat32.img
mkfs.fat -C -F 32 -s 1 -n FAT32SEED "$f" $((34 * 1024)) >/dev/null
fat_fill "$f"
seed guestfs_open fat32 "$f"

# ext2 and ext4 (journal, extents, metadata checksums) from the tree, 1 KiB blocks.
f=$work/ext2.img
mke2fs -q -F -t ext2 -b 1024 -L ext2seed -d "$tree" "$f" 2M 2>/dev/null
seed guestfs_open ext2 "$f"
f=$work/ext4.img
mke2fs -q -F -t ext4 -b 1024 -L ext4seed -J size=1 -d "$tree" "$f" 4M 2>/dev/null
seed guestfs_open ext4 "$f"
cp "$f" "$work/ext4-part.img"

# exFAT: files through exfat-fuse when FUSE works.
f=$work/exfat.img
truncate -s 4M "$f"
mkfs.exfat -L EXFATSEED "$f" >/dev/null
if timeout 20 mount.exfat-fuse "$f" "$mnt" 2>/dev/null; then
    cp -r "$tree/hello.txt" "$tree/A rather long file name, with spaces.text" "$tree/Sub Directory" "$mnt/"
    umount "$mnt"
else
    echo "  (exfat-fuse could not mount: the exFAT seed has an empty root)"
fi
seed guestfs_open exfat "$f"

# NTFS: mkntfs, then files through ntfs-3g (FUSE) or, failing that, ntfscp into the root.
# 4 MiB: the smallest volume whose MFT zone leaves room for the tree.
f=$work/ntfs.img
truncate -s 4M "$f"
mkntfs -F -f -q -L NTFSSEED "$f" >/dev/null 2>&1
if timeout 20 ntfs-3g "$f" "$mnt" 2>/dev/null; then
    cp -r "$tree/hello.txt" "$tree/A rather long file name, with spaces.text" "$tree/Sub Directory" "$tree/holey" "$mnt/"
    ln -s hello.txt "$mnt/short-link"
    ln "$mnt/hello.txt" "$mnt/hard-link"
    setfattr -n user.stream -v 'an alternate data stream' "$mnt/hello.txt" 2>/dev/null || true
    umount "$mnt"
else
    echo "  (ntfs-3g could not mount: the NTFS seed has files in its root only)"
    ntfscp -q "$f" "$tree/hello.txt" hello.txt
    ntfscp -q "$f" "$tree/Sub Directory/numbers.txt" numbers.txt
fi
# mkntfs fills the $LogFile with 0xFF pages ("empty log"): ~1 MiB that would dominate the seed.
# hyperkeep never reads the log (it reads NTFS as of the last clean unmount), so those pages are
# zeroed; every other byte is as ntfs-3g wrote it.
python3 - "$f" <<'PY'
import sys
p = sys.argv[1]
d = bytearray(open(p, "rb").read())
for i in range(0, len(d), 4096):
    if d[i:i + 4096] == b"\xff" * 4096:
        d[i:i + 4096] = bytes(4096)
open(p, "wb").write(d)
PY
seed guestfs_open ntfs "$f"

# Partitioned disks. GPT: ext4 at 1 MiB, FAT12 after it; the backup header at the end.
f=$work/gpt.img
truncate -s 8M "$f"
# (not -q: with it this sgdisk version writes no table)
sgdisk -n 1:2048:+4M -t 1:8300 -c 1:linux-data -n 2:0:+1M -t 2:0700 -c 2:fat-data "$f" >/dev/null
dd if="$work/ext4-part.img" of="$f" bs=512 seek=2048 conv=notrunc status=none
start2=$(sgdisk -i 2 "$f" | awk '/First sector/ {print $3}')
[ -n "$start2" ] || { echo "sgdisk made no partition 2" >&2; exit 1; }
dd if="$work/fat12.img" of="$f" bs=512 seek="$start2" conv=notrunc status=none
seed partitions gpt-ext4-fat12 "$f"
# MBR: a primary FAT12 and an extended partition whose logical partition holds ext2.
f=$work/mbr.img
truncate -s 6M "$f"
printf 'label: dos\n2048,2048,1\n4096,,5\n6144,4096,83\n' | sfdisk -q "$f"
dd if="$work/fat12.img" of="$f" bs=512 seek=2048 conv=notrunc status=none
dd if="$work/ext2.img" of="$f" bs=512 seek=6144 conv=notrunc status=none
seed partitions mbr-fat12-logical-ext2 "$f"
