#!/usr/bin/env python3
"""Read a VHD (and its parent chain) with libvhdi (pyvhdi), an independent implementation, and
write the guest-visible bytes to OUT.

usage: vhdi_read.py OUT IMAGE [PARENT [GRANDPARENT ...]]

Parents are given explicitly (child first, base last) and attached with set_parent, so libvhdi's
own locator handling is not involved. Prints the media size libvhdi reports.
"""
import sys

import pyvhdi


def main():
    out, files = sys.argv[1], sys.argv[2:]
    handles = []
    parent = None
    # Open from the base up, attaching each layer to the one below it.
    for path in reversed(files):
        f = pyvhdi.file()
        f.open(path)
        if parent is not None:
            f.set_parent(parent)
        handles.append(f)
        parent = f
    top = handles[-1]
    size = top.get_media_size()
    with open(out, "wb") as o:
        off = 0
        while off < size:
            n = min(1 << 20, size - off)
            data = top.read_buffer_at_offset(n, off)
            if len(data) != n:
                sys.exit(f"short read at {off}: {len(data)} of {n}")
            o.write(data)
            off += n
    print(size)


if __name__ == "__main__":
    main()
