#!/usr/bin/env bash
# Builds the QEMU test VM assets (kernel, initramfs, disk) into $HK_TESTVM_DIR (default
# target/testvm under the repository root). Idempotent: every step is skipped when its output
# exists, so a second run takes well under a second. Must run as root (apt) the first time.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${HK_TESTVM_DIR:-$repo/target/testvm}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
dl="$out/debs"
mkdir -p "$dl"

log() { echo "testvm: $*" >&2; }
export DEBIAN_FRONTEND=noninteractive

# --- 1. QEMU from bookworm-backports (Debian 12's own qemu-system 7.2 conflicts with the
# qemu-utils 10 from backports these machines ship, and cpr-reboot needs QEMU >= 8.2).
apt_updated=0
ensure_backports() {
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports to apt sources"
        # Same mirror and keyring as the existing Debian entry.
        cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt_updated=0
    fi
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq >&2
        apt_updated=1
    fi
}
if ! command -v qemu-system-x86_64 >/dev/null; then
    ensure_backports
    log "installing qemu-system-x86 from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >&2
fi

# --- 2. Packages we only unpack (no install hooks run): kernel, busybox, guest agent.
fetch_deb() { # $1 = package name; prints the path of the .deb
    local f
    f=$(ls "$dl"/"$1"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$f" ]; then
        (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$1" >&2) || {
            ensure_backports
            (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$1" >&2)
        }
        f=$(ls "$dl"/"$1"_*.deb | head -1)
    fi
    echo "$f"
}
kpkg_file="$out/kernel-package"
if [ ! -s "$kpkg_file" ]; then
    ensure_backports
    # Newest 6.1.0-N-amd64 image the mirror has (signed variant excluded: same kernel).
    kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' \
        | sort -t- -k4,4n | tail -1)
    [ -n "$kpkg" ] || { log "no linux-image-6.1.0-*-amd64 package found by apt-cache"; exit 1; }
    echo "$kpkg" > "$kpkg_file"
fi
kpkg=$(cat "$kpkg_file")
kdeb=$(fetch_deb "$kpkg")
bdeb=$(fetch_deb busybox-static)
gdeb=$(fetch_deb qemu-guest-agent)

unpack() { # $1 = deb, $2 = dir
    if [ ! -e "$2/.done" ]; then
        rm -rf "$2"; mkdir -p "$2"
        dpkg-deb -x "$1" "$2"
        touch "$2/.done"
    fi
}
unpack "$kdeb" "$out/kernel-root"
unpack "$bdeb" "$out/busybox-root"
unpack "$gdeb" "$out/qga-root"

kver=$(ls "$out/kernel-root/lib/modules" | head -1)
if [ ! -s "$out/vmlinuz" ]; then
    cp "$out/kernel-root/boot/vmlinuz-$kver" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi

# --- 3. The initramfs.
init_src="$here/init.sh"
initrd="$out/initrd.cpio.gz"
stamp="$out/initrd.stamp"
want_stamp="$(sha256sum "$init_src" "$here/build.sh" | sha256sum | cut -c1-16) $kver"
if [ ! -s "$initrd" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
    log "building initramfs for kernel $kver"
    root="$out/initrd-root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,run,lib/modules,lib64,usr/bin,usr/sbin,etc/acpi/PWRF}
    bb="$out/busybox-root/bin/busybox"
    cp "$bb" "$root/bin/busybox"
    for applet in $("$bb" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    # The modules we need; their dependencies (the `depends=` line of each module's .modinfo,
    # since the package has no modules.dep: depmod runs at install) are added first, so insmod
    # order is right. Missing ones (built in) are skipped.
    mods="virtio_pci virtio_blk virtio_console crc32c_generic ext4 button evdev"
    mdir="$out/kernel-root/lib/modules/$kver"
    : > "$root/lib/modules/order"
    add_mod() {
        local m="$1" f d
        grep -qx "$m" "$root/lib/modules/order" && return 0
        f=$(find "$mdir" -name "$m.ko" | head -1)
        [ -n "$f" ] || return 0
        for d in $(grep -ao "depends=[A-Za-z0-9_,-]*" "$f" | head -1 | sed "s/^depends=//" | tr "," " "); do
            add_mod "$d"
        done
        cp "$f" "$root/lib/modules/$m.ko"
        echo "$m" >> "$root/lib/modules/order"
    }
    for m in $mods; do add_mod "$m"; done
    # The guest agent and the shared libraries it links.
    qga="$out/qga-root/usr/sbin/qemu-ga"
    cp "$qga" "$root/usr/sbin/qemu-ga"
    ldd "$qga" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
        [ -f "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    mkdir -p "$root/lib64"
    [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
    cp "$init_src" "$root/init"
    chmod 755 "$root/init"
    printf '#!/bin/sh\n/bin/poweroff-clean\n' > "$root/etc/acpi/PWRF/00000080"
    chmod 755 "$root/etc/acpi/PWRF/00000080"
    (cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1 > "$initrd.tmp")
    mv "$initrd.tmp" "$initrd"
    echo "$want_stamp" > "$stamp"
fi

# --- 4. A template disk: raw ext4 (host mke2fs: busybox's is ext2-only) as a dynamic VHDX.
size_mib="${HK_TESTVM_DISK_MIB:-128}"
disk="$out/disk-template.vhdx"
if [ ! -s "$disk" ]; then
    log "making ${size_mib} MiB ext4 disk"
    raw="$out/disk.raw.tmp"
    rm -f "$raw"
    truncate -s "${size_mib}M" "$raw"
    mke2fs -q -F -t ext4 -L hktest "$raw"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$raw" "$disk.tmp"
    rm -f "$raw"
    mv "$disk.tmp" "$disk"
fi
log "ready in $out (kernel $kver)"
echo "$out"
