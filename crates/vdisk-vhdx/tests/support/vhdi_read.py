#!/usr/bin/env python3
"""Read a VHDX (and its parents) with libvhdi, an implementation independent of ours.

usage: vhdi_read.py OUT CHILD [PARENT [GRANDPARENT ...]]
Writes the whole guest-visible disk to OUT (use '-' to print its sha256 instead). Parents are
attached explicitly with set_parent, so libvhdi checks the parent linkage itself.
"""
import hashlib
import sys

import pyvhdi


def main():
    out, chain = sys.argv[1], sys.argv[2:]
    files = []
    for path in chain:
        f = pyvhdi.file()
        f.open(path)
        files.append(f)
    # Attach from the base upwards: each layer needs its parent already complete.
    for child, parent in reversed(list(zip(files, files[1:]))):
        child.set_parent(parent)
    top = files[0]
    size = top.get_media_size()
    digest = hashlib.sha256()
    sink = None if out == "-" else open(out, "wb")
    pos = 0
    while pos < size:
        n = min(4 << 20, size - pos)
        data = top.read_buffer_at_offset(n, pos)
        if len(data) != n:
            sys.exit(f"libvhdi returned {len(data)} bytes at {pos}, wanted {n}")
        if sink:
            sink.write(data)
        else:
            digest.update(data)
        pos += n
    if sink:
        sink.close()
    else:
        print(digest.hexdigest())


if __name__ == "__main__":
    main()
