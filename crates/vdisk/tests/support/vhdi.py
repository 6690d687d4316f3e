#!/usr/bin/env python3
"""Read a VHD/VHDX through libvhdi (PyPI libvhdi-python, module pyvhdi): an independent reader
the interop tests compare hyperkeep with.

usage:
  vhdi.py sha256 IMAGE [PARENT [GRANDPARENT ...]]   print the sha256 and size of the whole disk
  vhdi.py dump OUT IMAGE [PARENT [GRANDPARENT ...]] write the whole disk, as raw, to OUT
  vhdi.py info IMAGE                                media size, sector size, type, parent name

For a differencing disk, list its parents from the nearest to the base: each is opened and
attached with set_parent (libvhdi does not search for parents itself). libvhdi checks each
parent's identity against the child's parent linkage and fails if they do not match.
"""
import hashlib
import sys

try:
    import pyvhdi
except ImportError:
    sys.exit("vhdi.py: python module pyvhdi is missing: pip install libvhdi-python "
             "(scripts/test.sh installs it)")

CHUNK = 4 << 20


def open_chain(paths):
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    # Attach from the base upwards, so each parent is complete when its child gets it.
    for child, parent in reversed(list(zip(files, files[1:]))):
        child.set_parent(parent)
    return files


def chunks(f):
    size = f.get_media_size()
    off = 0
    while off < size:
        n = min(CHUNK, size - off)
        buf = f.read_buffer_at_offset(n, off)
        if len(buf) != n:
            sys.exit(f"vhdi.py: short read at {off}: {len(buf)} of {n} bytes")
        yield buf
        off += n


def main(argv):
    if len(argv) >= 2 and argv[0] == "sha256":
        top = open_chain(argv[1:])[0]
        h = hashlib.sha256()
        for b in chunks(top):
            h.update(b)
        print(h.hexdigest(), top.get_media_size())
    elif len(argv) >= 3 and argv[0] == "dump":
        top = open_chain(argv[2:])[0]
        with open(argv[1], "wb") as out:
            for b in chunks(top):
                out.write(b)
    elif len(argv) == 2 and argv[0] == "info":
        f = open_chain(argv[1:])[0]
        print(f"media_size={f.get_media_size()} bytes_per_sector={f.get_bytes_per_sector()} "
              f"disk_type={f.get_disk_type()} parent={f.get_parent_filename()}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
