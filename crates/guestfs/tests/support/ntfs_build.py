#!/usr/bin/env python3
"""Build NTFS test images for crates/guestfs/tests/ntfs_*.rs (needs root, ntfs-3g, attr).

usage: ntfs_build.py main|frag OUTDIR

Writes OUTDIR/IMG.img (the image), OUTDIR/src/ (every main stream's bytes, by path),
OUTDIR/streams/ (alternate data streams) and OUTDIR/manifest.json describing what the reader must
return: type, size, timestamps (ns), streams, link targets, hard-link groups.
"""
import json, os, random, struct, subprocess, sys

def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

class Builder:
    def __init__(self, out, name, size_mb):
        self.out = out
        self.img = os.path.join(out, name + ".img")
        self.mnt = os.path.join(out, "mnt-" + name)
        self.src = os.path.join(out, "src-" + name)
        self.streams = os.path.join(out, "streams-" + name)
        for d in (self.mnt, self.src, self.streams):
            os.makedirs(d, exist_ok=True)
        with open(self.img, "wb") as f:
            f.truncate(size_mb << 20)
        run("mkntfs", "-q", "-F", "-f", "-c", "4096", "-L", "HK" + name.upper(), self.img)
        run("ntfs-3g", "-o", "streams_interface=windows,compression", self.img, self.mnt)
        self.entries = {}
        self.times = []
        self.tick = 0

    def m(self, rel):
        return os.path.join(self.mnt, rel)

    def stamp(self, rel):
        # Distinct times with sub-second parts (NTFS keeps 100 ns).
        self.tick += 1
        mt = 1_600_000_000_000_000_000 + self.tick * 1_000_003_700
        at = mt + 86_400_000_000_000
        self.times.append((rel, at, mt))
        e = self.entries[rel]
        e["mtime"] = mt
        e["atime"] = at

    def mkdir(self, rel, attrib=None):
        os.makedirs(self.m(rel))
        os.makedirs(os.path.join(self.src, rel), exist_ok=True)
        if attrib is not None:
            run("setfattr", "-n", "system.ntfs_attrib_be", "-v", "0x%08x" % attrib, self.m(rel))
        self.entries[rel] = {"type": "directory", "streams": {}}
        self.stamp(rel)

    def file(self, rel, data, stamp=True):
        with open(self.m(rel), "wb") as f:
            f.write(data)
        with open(os.path.join(self.src, rel), "wb") as f:
            f.write(data)
        self.entries[rel] = {"type": "file", "size": len(data), "streams": {}, "nlink": 1}
        if stamp:
            self.stamp(rel)

    def stream(self, rel, name, data):
        with open(self.m(rel) + ":" + name, "wb") as f:
            f.write(data)
        key = rel.replace("/", "__") + "__" + name
        with open(os.path.join(self.streams, key), "wb") as f:
            f.write(data)
        self.entries[rel]["streams"][name] = key

    def finish(self, extra):
        # Times last, deepest first, since creating children changes a directory's mtime.
        for rel, at, mt in sorted(self.times, key=lambda t: -t[0].count("/")):
            os.utime(self.m(rel), ns=(at, mt), follow_symlinks=False)
        run("umount", self.mnt)
        manifest = {"image": self.img, "src": self.src, "streams": self.streams,
                    "entries": self.entries}
        manifest.update(extra)
        name = os.path.basename(self.img)[:-4]
        with open(os.path.join(self.out, name + ".json"), "w") as f:
            json.dump(manifest, f, indent=1)

def reparse_link(tag, target, print_name, relative):
    subst = target.encode("utf-16-le")
    prn = print_name.encode("utf-16-le")
    if tag == 0xA000000C:
        body = struct.pack("<HHHHI", 0, len(subst), len(subst), len(prn), 1 if relative else 0)
    else:
        # Junctions store each name NUL-terminated.
        subst += b"\0\0"
        prn += b"\0\0"
        body = struct.pack("<HHHH", 0, len(subst) - 2, len(subst), len(prn) - 2)
    body += subst + prn
    return struct.pack("<IHH", tag, len(body), 0) + body

def set_reparse(path, data):
    run("setfattr", "-n", "system.ntfs_reparse_data", "-v", "0x" + data.hex(), path)

def xpress_huffman(data):
    """Compress one chunk (<= 64 KiB) as LZXPRESS Huffman ([MS-XCA] 2.2) with a flat code: all
    512 symbols 9 bits long, so symbol s has code s. Greedy matching; mirrors the decoder's
    word-refill timing so match-length bytes land where the decoder reads them."""
    out = bytearray(b"\x99" * 256)
    slots = []
    st = {"acc": 0, "n": 0, "total": 0, "done": 0}
    def reserve():
        slots.append(len(out)); out.extend(b"\0\0")
    reserve(); reserve()
    def put(value, nbits):
        for i in range(nbits - 1, -1, -1):
            st["acc"] = (st["acc"] << 1) | ((value >> i) & 1)
            st["n"] += 1
            if st["n"] == 16:
                pos = slots[st["done"]]
                out[pos:pos + 2] = struct.pack("<H", st["acc"])
                st["done"] += 1; st["acc"] = 0; st["n"] = 0
        st["total"] += nbits
        # The decoder loads word k (k >= 2) once more than 16*(k-1) bits are consumed.
        while st["total"] > 16 * (len(slots) - 1):
            reserve()
    last = {}
    pos = 0
    while pos < len(data):
        cand = last.get(data[pos:pos + 3]) if pos + 3 <= len(data) else None
        length = 0
        if cand is not None and pos - cand < 65536:
            while pos + length < len(data) and data[cand + length] == data[pos + length] and length < 5000:
                length += 1
        if length >= 3:
            dist = pos - cand
            obits = dist.bit_length() - 1
            l = length - 3
            put(256 + (obits << 4) + min(l, 15), 9)
            if l >= 15:
                if l - 15 < 255:
                    out.append(l - 15)
                else:
                    out.append(255); out.extend(struct.pack("<H", l))
            put(dist - (1 << obits), obits)
            for k in range(pos, pos + length):
                last[data[k:k + 3]] = k
            pos += length
        else:
            put(data[pos], 9)
            last[data[pos:pos + 3]] = pos
            pos += 1
    if st["n"] > 0:
        pos = slots[st["done"]]
        out[pos:pos + 2] = struct.pack("<H", (st["acc"] << (16 - st["n"])) & 0xFFFF)
    return bytes(out) + b"\0\0\0\0"

def wof_file(b, rel, data, algorithm, chunk):
    """A CompactOS file as Windows leaves it: reparse tag 0x80000017 (file provider), chunks in
    the WofCompressedData stream, the main stream a placeholder of the real size."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    blobs = []
    for c in chunks:
        z = xpress_huffman(c)
        blobs.append(z if len(z) < len(c) else c)
    table = b""
    off = 0
    for z in blobs[:-1]:
        off += len(z)
        table += struct.pack("<I", off)
    b.file(rel, b"", stamp=False)
    with open(b.m(rel) + ":WofCompressedData", "wb") as f:
        f.write(table + b"".join(blobs))
    with open(b.m(rel), "r+b") as f:
        f.truncate(len(data))
    set_reparse(b.m(rel), struct.pack("<IHHIIIII", 0x80000017, 20, 0, 1, 2, 1, algorithm, 0))
    with open(os.path.join(b.src, rel), "wb") as f:
        f.write(data)
    b.entries[rel] = {"type": "file", "size": len(data), "nlink": 1,
                      "streams": {}, "wof": True}
    return blobs

def main_image(out):
    r = random.Random(4)
    b = Builder(out, "main", 64)
    b.file("small.txt", b"hello, resident world\n")
    b.file("large.bin", r.randbytes(3 * 1024 * 1024 + 123))
    b.file("empty.txt", b"")
    b.mkdir("bigdir")
    for i in range(600):
        b.file("bigdir/file_%04d_with_a_longer_name.txt" % i, b"content %d\n" % i * (i % 7 + 1), stamp=(i % 50 == 0))
    b.mkdir("comp", attrib=0x800 | 0x10)
    text = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i for i in range(8000))
    b.file("comp/text.txt", text)
    b.file("comp/random.bin", r.randbytes(200_000))
    mixed = b"".join((r.randbytes(40_000) if i % 2 else text[:40_000]) for i in range(24))
    b.file("comp/mixed.bin", mixed)
    b.file("comp/zeros.bin", bytes(300_000))
    b.file("comp/tiny.txt", b"tiny compressed-directory file\n")
    with open(b.m("comp/sparse_comp.bin"), "wb") as f:
        f.write(text[:5000]); f.seek(1_000_000); f.write(text[:70_000])
    with open(os.path.join(b.src, "comp/sparse_comp.bin"), "wb") as f:
        f.write(text[:5000]); f.seek(1_000_000); f.write(text[:70_000])
    b.entries["comp/sparse_comp.bin"] = {"type": "file", "size": 1_070_000, "streams": {}, "nlink": 1}
    b.stamp("comp/sparse_comp.bin")
    b.file("ads.txt", b"main stream\n")
    b.stream("ads.txt", "secret", b"hidden stream data\n")
    b.stream("ads.txt", "big", r.randbytes(100_000))
    with open(b.m("sparse.bin"), "wb") as f:
        f.write(b"start"); f.seek(20_000_000); f.write(b"end")
    with open(os.path.join(b.src, "sparse.bin"), "wb") as f:
        f.write(b"start"); f.seek(20_000_000); f.write(b"end")
    b.entries["sparse.bin"] = {"type": "file", "size": 20_000_003, "streams": {}, "nlink": 1, "sparse": True}
    b.stamp("sparse.bin")
    b.mkdir("links")
    b.file("links/hl_a.txt", b"hard linked\n")
    os.link(b.m("links/hl_a.txt"), b.m("hl_b.txt"))
    with open(os.path.join(b.src, "hl_b.txt"), "wb") as f:
        f.write(b"hard linked\n")
    b.entries["links/hl_a.txt"]["nlink"] = 2
    b.entries["hl_b.txt"] = dict(b.entries["links/hl_a.txt"])
    b.entries["hl_b.txt"]["same_as"] = "links/hl_a.txt"
    b.file("links/sym", b"", stamp=False)
    set_reparse(b.m("links/sym"), reparse_link(0xA000000C, "..\\small.txt", "..\\small.txt", True))
    b.entries["links/sym"] = {"type": "symlink", "target": "..\\small.txt", "streams": {}}
    b.file("links/abs", b"", stamp=False)
    set_reparse(b.m("links/abs"), reparse_link(0xA000000C, "\\??\\C:\\Windows\\notepad.exe", "C:\\Windows\\notepad.exe", False))
    b.entries["links/abs"] = {"type": "symlink", "target": "C:\\Windows\\notepad.exe", "streams": {}}
    os.makedirs(b.m("links/junction"))
    set_reparse(b.m("links/junction"), reparse_link(0xA0000003, "\\??\\C:\\Users\\Public", "C:\\Users\\Public", False))
    b.entries["links/junction"] = {"type": "junction", "target": "C:\\Users\\Public", "streams": {}}
    os.makedirs(os.path.join(b.src, "links"), exist_ok=True)
    b.mkdir("unicodé")
    for name in ["Ünïcödé.txt", "日本語のファイル.txt", "emoji_😀.txt", "Ελληνικά", "mixed CASE Name.TXT"]:
        b.file("unicodé/" + name, name.encode("utf-8") * 3)
    # CompactOS (WOF) files: XPRESS8K (text, long matches), XPRESS4K (some chunks stored raw),
    # XPRESS16K; and an LZX one, which is refused.
    b.mkdir("wof")
    wtext = b"".join(b"%d: Windows Overlay Filter %s\n" % (i, b"x" * (i % 400)) for i in range(300))
    blobs = wof_file(b, "wof/text8k.txt", wtext, 2, 8192)
    assert any(len(z) < 8192 for z in blobs)
    wmix = b"".join((r.randbytes(4096) if i % 3 == 0 else wtext[i * 4096:(i + 1) * 4096]) for i in range(12)) + b"tail"
    blobs = wof_file(b, "wof/mixed4k.bin", wmix, 0, 4096)
    assert any(len(z) == 4096 for z in blobs) and any(len(z) < 4096 for z in blobs)
    wof_file(b, "wof/text16k.txt", wtext[:40000], 3, 16384)
    wof_file(b, "wof/lzx.exe", b"L" * 50_000, 1, 32768)
    b.entries["wof/lzx.exe"]["type"] = "wof-refused"
    b.file("manystreams.txt", b"base data\n")
    for i in range(120):
        b.stream("manystreams.txt", "stream%03d" % i, (b"stream %d " % i) * (i + 5))
    b.finish({"case_lookup": [["UNICODÉ/ünïcödé.TXT", "unicodé/Ünïcödé.txt"], ["BIGDIR/FILE_0001_WITH_A_LONGER_NAME.TXT", "bigdir/file_0001_with_a_longer_name.txt"]]})

def frag_image(out):
    r = random.Random(7)
    b = Builder(out, "frag", int(os.environ.get("NTFS_FRAG_MB", "48")))
    # Fill the volume with small files, then free every other one: later allocations ($MFT
    # growth, directory indexes, big files) land in many small holes.
    b.mkdir("fill")
    n = 0
    while True:
        try:
            with open(b.m("fill/f%05d" % n), "wb") as f:
                f.write(bytes([n % 251]) * 4096)
        except OSError:
            break
        n += 1
    # The file that hit "no space" exists, partly written: drop it, and one more to make room.
    os.remove(b.m("fill/f%05d" % n))
    os.remove(b.m("fill/f%05d" % (n - 1)))
    n -= 1
    for i in range(0, n, 2):
        os.remove(b.m("fill/f%05d" % i))
    for i in range(1, n, 2):
        b.entries["fill/f%05d" % i] = {"type": "file", "size": 4096, "streams": {}, "nlink": 1}
        with open(os.path.join(b.src, "fill/f%05d" % i), "wb") as f:
            f.write(bytes([i % 251]) * 4096)
    b.file("large1.bin", r.randbytes(1_000_000))
    # The directory grows its index one 4 KiB record at a time; a 4 KiB spacer file written
    # right after each growth takes the next free cluster, so every index record becomes its own
    # run and the index's runlist overflows into further MFT records.
    b.mkdir("hugedir")
    b.mkdir("spacers")
    last = os.stat(b.m("hugedir")).st_size
    spacers = 0
    for i in range(int(os.environ.get("NTFS_FRAG_FILES", "9000"))):
        b.file("hugedir/entry_with_quite_a_long_name_%05d.dat" % i, b"", stamp=(i % 500 == 0))
        size = os.stat(b.m("hugedir")).st_size
        if size != last:
            last = size
            b.file("spacers/s%05d" % spacers, bytes([spacers % 256]) * 4096, stamp=False)
            spacers += 1
    b.file("large2.bin", r.randbytes(500_000))
    b.finish({"fill_count": n})

def small_image(out):
    r = random.Random(11)
    b = Builder(out, "small", 16)
    b.file("small.txt", b"small resident file\n")
    b.file("data.bin", r.randbytes(100_000))
    b.mkdir("d")
    for i in range(60):
        b.file("d/entry_number_%03d_with_a_long_name.txt" % i, b"%d" % i)
    b.mkdir("d2")
    b.file("d2/a.txt", b"a")
    b.file("d2/b.txt", b"b")
    b.mkdir("comp", attrib=0x810)
    b.file("comp/text.txt", b"".join(b"compressible line %05d\n" % i for i in range(9000)))
    b.file("ads.txt", b"x")
    b.stream("ads.txt", "s", b"stream")
    b.file("sym", b"", stamp=False)
    set_reparse(b.m("sym"), reparse_link(0xA000000C, "small.txt", "small.txt", True))
    b.entries["sym"] = {"type": "symlink", "target": "small.txt", "streams": {}}
    b.finish({})

if __name__ == "__main__":
    try:
        {"main": main_image, "frag": frag_image, "small": small_image}[sys.argv[1]](sys.argv[2])
    except BaseException:
        subprocess.run(["umount", os.path.join(sys.argv[2], "mnt-" + sys.argv[1])], stderr=subprocess.DEVNULL)
        raise
