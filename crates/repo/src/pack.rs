//! Pack files: many sealed blobs in one object, with a sealed trailer listing them.
//!
//! ```text
//! pack    = blob* || trailer_sealed || u32 LE len(trailer_sealed) || "HKPACK01"
//! blob    = MasterKey::seal(payload); payload = zstd frame, or the raw bytes
//! trailer = MasterKey::seal(u32 LE count || entry*count)
//! entry   = id[32] || kind u8 (0 data, 1 tree) || compression u8 (0 raw, 1 zstd)
//!           || offset u64 LE || stored_len u32 LE || raw_len u32 LE
//!           || reserved[8] (zero)                                            (58 bytes)
//! ```
//! The pack's object name is the unkeyed BLAKE3 of the whole file, so anyone can verify a pack
//! without the key. The trailer makes each pack self-describing: the index is a cache that can
//! always be rebuilt from the packs alone ([`read_pack_trailer`]). Large packs (not one object
//! per chunk) keep object counts, listing times and per-request costs of object stores low.
//!
//! A blob's id is the keyed hash of its raw (uncompressed) bytes, so identical chunks get the
//! same id whatever the compression outcome, and every read can be checked end to end.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ObjectKind};
use crate::crypto::{hash, Id, MasterKey, SEAL_OVERHEAD};
use crate::{Error, Result};

/// Last 8 bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"HKPACK01";
/// Bytes after the sealed trailer: its length (u32 LE) and the magic.
pub const PACK_FOOTER_LEN: u64 = 12;
/// Alignment of a pack in its writer's buffer: what O_DIRECT needs (see `backend.rs`).
const PACK_ALIGN: usize = 4096;
/// Bytes per trailer entry.
pub const TRAILER_ENTRY_LEN: usize = 58;

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// A chunk of disk or file content.
    Data,
    /// Part of a chunk table (snapshot metadata).
    Tree,
}

/// One blob of a pack, as listed in its trailer and in index files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Keyed hash of the raw bytes.
    pub id: Id,
    pub kind: BlobKind,
    /// Payload is a zstd frame (else the raw bytes).
    pub compressed: bool,
    /// Where the sealed blob starts in the pack.
    pub offset: u64,
    /// Sealed length (payload + 40).
    pub stored_len: u32,
    /// Length of the raw bytes.
    pub raw_len: u32,
}

/// Collects sealed blobs in memory until the pack is big enough, then produces the pack file.
#[derive(Debug)]
pub struct PackWriter {
    /// `buf[start..]` is the pack. The `start` bytes before it are padding that puts the pack
    /// at a 4096-aligned address, so the backend can write it with O_DIRECT straight from
    /// this buffer instead of copying it through an aligned bounce buffer (a copy of every
    /// stored byte). Plain `Vec<u8>` with padding rather than an aligned allocation: no unsafe
    /// code, and if the buffer ever has to grow and moves, the pack is only unaligned, which
    /// the backend handles with its bounce buffer.
    buf: Vec<u8>,
    start: usize,
    entries: Vec<BlobEntry>,
    target_size: u64,
}

impl PackWriter {
    /// A writer whose [`PackWriter::is_full`] turns true at `target_size` bytes (the
    /// repository's `pack_size`).
    pub fn new(target_size: u64) -> PackWriter {
        PackWriter::with_buffer(target_size, Vec::new())
    }

    /// Like [`PackWriter::new`], reusing the allocation of an earlier pack's file (see
    /// [`crate::repository::Repository::save_pack_reuse`]): a fresh pack buffer is tens of MiB
    /// that the kernel must fault in and zero page by page, for every pack of a backup.
    pub fn with_buffer(target_size: u64, mut buf: Vec<u8>) -> PackWriter {
        buf.clear();
        PackWriter {
            buf,
            start: 0,
            entries: Vec::new(),
            target_size,
        }
    }

    /// Append a sealed blob. `entry.offset` and `entry.stored_len` are filled in here.
    pub fn add(&mut self, entry: BlobEntry, sealed: Vec<u8>) {
        self.add_slice(entry, &sealed);
    }

    /// Like [`PackWriter::add`], without taking ownership.
    pub fn add_slice(&mut self, mut entry: BlobEntry, sealed: &[u8]) {
        self.reserve_once();
        entry.offset = self.size();
        // Blobs are chunks of at most the repository's chunk size (16 MiB at most), so this
        // cannot overflow for anything a caller of this crate produces.
        entry.stored_len = u32::try_from(sealed.len()).expect("blob larger than 4 GiB");
        self.buf.extend_from_slice(sealed);
        self.entries.push(entry);
    }

    /// Seal `payload` (the zstd frame or raw bytes of the blob) straight into the pack and
    /// append it: the same bytes as [`PackWriter::add`] of `key.seal(payload)`, without a
    /// sealed copy of every blob on its way into the pack. `entry.offset` and
    /// `entry.stored_len` are filled in here.
    pub fn add_sealing(&mut self, key: &MasterKey, mut entry: BlobEntry, payload: &[u8]) {
        self.reserve_once();
        entry.offset = self.size();
        // As in `add_slice`: blobs are at most 16 MiB.
        entry.stored_len =
            u32::try_from(payload.len() + SEAL_OVERHEAD).expect("blob larger than 4 GiB");
        key.seal_append(&mut self.buf, payload);
        self.entries.push(entry);
    }

    fn reserve_once(&mut self) {
        if self.buf.is_empty() {
            // Room for the target plus the blob that crosses it and the trailer, so the
            // buffer is allocated once rather than doubled past the target; plus the padding
            // to the aligned start.
            let target = self.target_size.min(1 << 30);
            self.buf
                .reserve(usize::try_from(target + target / 4).unwrap_or(0) + 2 * PACK_ALIGN);
            let misalign = self.buf.as_ptr() as usize % PACK_ALIGN;
            self.start = (PACK_ALIGN - misalign) % PACK_ALIGN;
            self.buf.resize(self.start, 0);
        }
    }

    /// Bytes of blobs so far.
    pub fn size(&self) -> u64 {
        (self.buf.len() - self.start) as u64
    }

    /// Blobs so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the pack has reached its target size and should be finished.
    pub fn is_full(&self) -> bool {
        self.size() >= self.target_size
    }

    /// The blobs added so far (offsets filled in).
    pub fn entries(&self) -> &[BlobEntry] {
        &self.entries
    }

    /// Append the sealed trailer and footer. Returns the pack's name (BLAKE3 of the file), the
    /// file, and its blobs.
    pub fn finish(self, key: &MasterKey) -> (Id, Vec<u8>, Vec<BlobEntry>) {
        let (id, mut buf, start, entries) = self.finish_in_place(key);
        // Only callers that keep the file in memory get here; the repository's pack writes
        // use `finish_in_place` and write from the aligned start without this move.
        buf.drain(..start);
        (id, buf, entries)
    }

    /// Like [`PackWriter::finish`], leaving the pack where it was built: the file is
    /// `buf[start..]` (4096-aligned in memory unless the buffer had to grow). Returns the
    /// pack's name, the buffer, `start`, and the blobs.
    pub fn finish_in_place(self, key: &MasterKey) -> (Id, Vec<u8>, usize, Vec<BlobEntry>) {
        let PackWriter {
            mut buf,
            start,
            entries,
            ..
        } = self;
        let mut plain = Vec::with_capacity(4 + entries.len() * TRAILER_ENTRY_LEN);
        plain.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in &entries {
            plain.extend_from_slice(&e.id.0);
            plain.push(match e.kind {
                BlobKind::Data => 0,
                BlobKind::Tree => 1,
            });
            plain.push(u8::from(e.compressed));
            plain.extend_from_slice(&e.offset.to_le_bytes());
            plain.extend_from_slice(&e.stored_len.to_le_bytes());
            plain.extend_from_slice(&e.raw_len.to_le_bytes());
            plain.extend_from_slice(&[0u8; 8]);
        }
        let sealed = key.seal(&plain);
        buf.extend_from_slice(&sealed);
        buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        buf.extend_from_slice(PACK_MAGIC);
        let id = hash(&buf[start..]);
        (id, buf, start, entries)
    }
}

thread_local! {
    // One zstd context per thread and level: creating one per chunk would allocate and clear
    // about a megabyte each time, a measurable share of the per-chunk work.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The zstd frame of `raw` at `level` if it is smaller than `raw`, else `None`.
fn compress_smaller(level: i32, raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 2 {
        return None;
    }
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, compressor) = slot.as_mut()?;
        // A buffer one byte short of the input: output that does not fit is output that does
        // not pay, and zstd reports it instead of writing past the end.
        let mut out = Vec::with_capacity(raw.len() - 1);
        compressor.compress_to_buffer(raw, &mut out).ok()?;
        (out.len() < raw.len()).then_some(out)
    })
}

/// Compress with zstd at `level`; the raw bytes when compression does not make them smaller.
/// Returns (compressed, payload).
pub fn compress(level: i32, raw: &[u8]) -> (bool, Vec<u8>) {
    match compress_smaller(level, raw) {
        Some(c) => (true, c),
        None => (false, raw.to_vec()),
    }
}

/// Compress (when it pays) and seal raw bytes: what goes into a pack. Returns
/// (compressed, sealed).
pub fn seal_blob(key: &MasterKey, level: i32, raw: &[u8]) -> (bool, Vec<u8>) {
    match compress_smaller(level, raw) {
        Some(c) => (true, key.seal(&c)),
        None => (false, key.seal(raw)),
    }
}

/// Decompress a zstd frame that must expand to exactly `raw_len` bytes. Never allocates more
/// than `raw_len`, whatever the frame claims.
pub fn decompress(data: &[u8], raw_len: u32) -> std::result::Result<Vec<u8>, String> {
    let cap = raw_len as usize;
    let out = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, cap).map_err(|e| format!("zstd: {e}")),
            None => Err("zstd: no decompression context".to_string()),
        }
    })?;
    if out.len() != cap {
        return Err(format!(
            "decompressed to {} bytes, the index says {raw_len}",
            out.len()
        ));
    }
    Ok(out)
}

/// Turn a sealed blob back into its raw bytes and prove they are what `entry` names: open
/// (authenticate + decrypt), decompress (at most `entry.raw_len` bytes, which must be at most
/// `max_raw_len`), and compare the keyed hash with `entry.id`. Errors name the pack and blob.
pub fn open_blob(
    key: &MasterKey,
    pack: &Id,
    entry: &BlobEntry,
    sealed: &[u8],
    max_raw_len: u32,
) -> Result<Vec<u8>> {
    let object = ObjectKind::Pack.key(&pack.to_hex());
    let bad = |detail: String| Error::corrupt(&object, format!("blob {}: {detail}", entry.id));
    if entry.raw_len > max_raw_len {
        return Err(bad(format!(
            "claims {} raw bytes, more than the repository's largest blob ({max_raw_len})",
            entry.raw_len
        )));
    }
    let payload = key
        .open(sealed)
        .map_err(|_| bad("fails authentication (damaged, or not this repository's key)".into()))?;
    let raw = if entry.compressed {
        decompress(&payload, entry.raw_len).map_err(bad)?
    } else {
        if payload.len() != entry.raw_len as usize {
            return Err(bad(format!(
                "is {} bytes, the index says {}",
                payload.len(),
                entry.raw_len
            )));
        }
        payload
    };
    if key.chunk_id(&raw) != entry.id {
        return Err(bad("content does not match its id".into()));
    }
    Ok(raw)
}

/// Decode a sealed trailer. `blobs_end` is where the trailer starts in the pack: every blob must
/// lie before it. Errors name the pack.
pub fn parse_trailer(
    key: &MasterKey,
    pack: &Id,
    sealed_trailer: &[u8],
    blobs_end: u64,
) -> Result<Vec<BlobEntry>> {
    let object = ObjectKind::Pack.key(&pack.to_hex());
    let plain = key.open(sealed_trailer).map_err(|_| {
        Error::corrupt(
            &object,
            "pack trailer fails authentication (damaged, or not this repository's key)",
        )
    })?;
    if plain.len() < 4 {
        return Err(Error::corrupt(&object, "pack trailer too short"));
    }
    let count = u32::from_le_bytes(plain[..4].try_into().unwrap_or_default()) as usize;
    let body = &plain[4..];
    if count.checked_mul(TRAILER_ENTRY_LEN) != Some(body.len()) {
        return Err(Error::corrupt(
            &object,
            format!(
                "pack trailer says {count} blobs but holds {} bytes of entries",
                body.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for (i, rec) in body.chunks_exact(TRAILER_ENTRY_LEN).enumerate() {
        let bad = |d: &str| Error::corrupt(&object, format!("pack trailer entry {i}: {d}"));
        let mut id = [0u8; 32];
        id.copy_from_slice(&rec[..32]);
        let kind = match rec[32] {
            0 => BlobKind::Data,
            1 => BlobKind::Tree,
            k => return Err(bad(&format!("unknown blob kind {k}"))),
        };
        let compressed = match rec[33] {
            0 => false,
            1 => true,
            c => return Err(bad(&format!("unknown compression {c}"))),
        };
        let offset = u64::from_le_bytes(rec[34..42].try_into().unwrap_or_default());
        let stored_len = u32::from_le_bytes(rec[42..46].try_into().unwrap_or_default());
        let raw_len = u32::from_le_bytes(rec[46..50].try_into().unwrap_or_default());
        // The format has 58 bytes per entry; bytes 50..58 are reserved and zero.
        if rec[50..58].iter().any(|&b| b != 0) {
            return Err(bad("reserved bytes are not zero"));
        }
        if (stored_len as usize) < SEAL_OVERHEAD {
            return Err(bad("stored length shorter than the encryption overhead"));
        }
        if offset
            .checked_add(u64::from(stored_len))
            .is_none_or(|end| end > blobs_end)
        {
            return Err(bad("blob lies outside the pack's data"));
        }
        if !compressed && raw_len as usize + SEAL_OVERHEAD != stored_len as usize {
            return Err(bad("raw length does not match the stored length"));
        }
        out.push(BlobEntry {
            id: Id(id),
            kind,
            compressed,
            offset,
            stored_len,
            raw_len,
        });
    }
    Ok(out)
}

/// Locate the sealed trailer from the last 12 bytes of a pack of `pack_size` bytes: returns
/// (trailer offset, trailer length).
pub fn parse_footer(pack: &Id, footer: &[u8], pack_size: u64) -> Result<(u64, u64)> {
    let object = ObjectKind::Pack.key(&pack.to_hex());
    if pack_size < PACK_FOOTER_LEN || footer.len() != PACK_FOOTER_LEN as usize {
        return Err(Error::corrupt(
            &object,
            format!("pack too short ({pack_size} bytes)"),
        ));
    }
    if &footer[4..12] != PACK_MAGIC {
        return Err(Error::corrupt(
            &object,
            "not a pack (magic missing at its end)",
        ));
    }
    let len = u64::from(u32::from_le_bytes(
        footer[..4].try_into().unwrap_or_default(),
    ));
    // Bounded by the real size before anything is allocated for it.
    if len > pack_size - PACK_FOOTER_LEN || len < (SEAL_OVERHEAD + 4) as u64 {
        return Err(Error::corrupt(
            &object,
            format!("pack trailer length {len} impossible for a pack of {pack_size} bytes"),
        ));
    }
    Ok((pack_size - PACK_FOOTER_LEN - len, len))
}

/// Read a pack's blob list from its trailer (two range reads), for rebuilding the index and
/// for `check`. `pack_size` is the object's real size (from listing).
pub fn read_pack_trailer(
    backend: &dyn Backend,
    key: &MasterKey,
    pack: &Id,
    pack_size: u64,
) -> Result<Vec<BlobEntry>> {
    let name = pack.to_hex();
    if pack_size < PACK_FOOTER_LEN {
        return Err(Error::corrupt(
            ObjectKind::Pack.key(&name),
            format!("pack too short ({pack_size} bytes)"),
        ));
    }
    let footer = backend.get_range(
        ObjectKind::Pack,
        &name,
        pack_size - PACK_FOOTER_LEN,
        PACK_FOOTER_LEN,
    )?;
    let (start, len) = parse_footer(pack, &footer, pack_size)?;
    let sealed = backend.get_range(ObjectKind::Pack, &name, start, len)?;
    parse_trailer(key, pack, &sealed, start)
}

/// A whole pack's blob list from its bytes (check --read-data reads whole packs anyway).
/// Does not verify the name; compare `hash(bytes)` with it separately.
pub fn parse_pack(key: &MasterKey, pack: &Id, bytes: &[u8]) -> Result<Vec<BlobEntry>> {
    let size = bytes.len() as u64;
    let footer_at = bytes.len().saturating_sub(PACK_FOOTER_LEN as usize);
    let (start, len) = parse_footer(pack, &bytes[footer_at..], size)?;
    parse_trailer(
        key,
        pack,
        &bytes[start as usize..(start + len) as usize],
        start,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Cipher;

    fn build(key: &MasterKey, chunks: &[Vec<u8>]) -> (Id, Vec<u8>, Vec<BlobEntry>) {
        let mut w = PackWriter::new(1 << 20);
        for (i, raw) in chunks.iter().enumerate() {
            let (compressed, sealed) = seal_blob(key, 1, raw);
            let kind = if i % 2 == 0 {
                BlobKind::Data
            } else {
                BlobKind::Tree
            };
            w.add(
                BlobEntry {
                    id: key.chunk_id(raw),
                    kind,
                    compressed,
                    offset: 0,
                    stored_len: 0,
                    raw_len: raw.len() as u32,
                },
                sealed,
            );
        }
        assert_eq!(w.len(), chunks.len());
        w.finish(key)
    }

    fn sample_chunks() -> Vec<Vec<u8>> {
        let mut noise = vec![0u8; 5000];
        crate::crypto::random_bytes(&mut noise);
        vec![
            b"hello hello hello hello hello hello".repeat(100),
            noise,
            vec![7u8; 1],
            Vec::new(),
        ]
    }

    #[test]
    fn pack_round_trip() {
        let key = MasterKey::generate(Cipher::default());
        let chunks = sample_chunks();
        let (id, bytes, entries) = build(&key, &chunks);
        assert_eq!(id, hash(&bytes));
        assert_eq!(&bytes[bytes.len() - 8..], PACK_MAGIC);
        assert!(entries[0].compressed, "repetitive data compresses");
        assert!(!entries[1].compressed, "random data is stored raw");
        assert_eq!(parse_pack(&key, &id, &bytes).unwrap(), entries);

        let dir = tempfile::tempdir().unwrap();
        let b = crate::backend::LocalBackend::new(dir.path());
        b.put(ObjectKind::Pack, &id.to_hex(), &bytes).unwrap();
        let listed = read_pack_trailer(&b, &key, &id, bytes.len() as u64).unwrap();
        assert_eq!(listed, entries);
        for (e, raw) in entries.iter().zip(&chunks) {
            let sealed = &bytes[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize];
            assert_eq!(&open_blob(&key, &id, e, sealed, 1 << 20).unwrap(), raw);
            // A size cap below the claimed raw length refuses before decompressing.
            if e.raw_len > 0 {
                assert!(open_blob(&key, &id, e, sealed, e.raw_len - 1).is_err());
            }
        }
        // Wrong key: the trailer does not open.
        assert!(matches!(
            parse_pack(&MasterKey::generate(Cipher::default()), &id, &bytes),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn sealing_in_place_builds_the_same_pack_aligned() {
        // `add_sealing` + `finish_in_place` (the backup's path) must give a pack of the same
        // layout as `add` of separately sealed blobs + `finish`, starting 4096-aligned.
        let key = MasterKey::generate(Cipher::default());
        let chunks = sample_chunks();
        let mut w = PackWriter::with_buffer(1 << 20, Vec::new());
        for raw in &chunks {
            let (compressed, payload) = compress(1, raw);
            let entry = BlobEntry {
                id: key.chunk_id(raw),
                kind: BlobKind::Data,
                compressed,
                offset: 0,
                stored_len: 0,
                raw_len: raw.len() as u32,
            };
            w.add_sealing(&key, entry, &payload);
        }
        let (id, buf, start, entries) = w.finish_in_place(&key);
        let bytes = &buf[start..];
        assert!((bytes.as_ptr() as usize).is_multiple_of(PACK_ALIGN));
        assert_eq!(id, hash(bytes));
        assert_eq!(parse_pack(&key, &id, bytes).unwrap(), entries);
        let (_, plain, plain_entries) = build(&key, &chunks);
        assert_eq!(
            bytes.len(),
            plain.len(),
            "same layout, only the nonces differ"
        );
        for ((e, p), raw) in entries.iter().zip(&plain_entries).zip(&chunks) {
            assert_eq!((e.offset, e.stored_len), (p.offset, p.stored_len));
            let sealed = &bytes[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize];
            assert_eq!(&open_blob(&key, &id, e, sealed, 1 << 20).unwrap(), raw);
        }
    }

    #[test]
    fn tampered_blobs_and_trailers_are_detected() {
        let key = MasterKey::generate(Cipher::default());
        let chunks = sample_chunks();
        let (id, bytes, entries) = build(&key, &chunks);
        // Every byte of the trailer region and footer: flipping it breaks parsing.
        let trailer_start = entries
            .last()
            .map(|e| e.offset + u64::from(e.stored_len))
            .unwrap() as usize;
        for pos in trailer_start..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x01;
            assert!(
                parse_pack(&key, &id, &bad).is_err(),
                "flip at {pos} undetected"
            );
        }
        // A flipped blob byte: authentication fails, naming pack and blob.
        let e = entries[0];
        let mut sealed =
            bytes[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize].to_vec();
        sealed[50] ^= 0x80;
        let err = open_blob(&key, &id, &e, &sealed, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&id.to_hex()) && err.contains(&e.id.to_hex()),
            "{err}"
        );
        // A valid blob listed under another id: the keyed hash check catches it.
        let good = &bytes[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize];
        let mut wrong = e;
        wrong.id = Id([9; 32]);
        assert!(open_blob(&key, &id, &wrong, good, 1 << 20).is_err());
        // Truncated packs and hostile footers never panic or over-allocate.
        for cut in [0usize, 1, 11, 12, 13, bytes.len() / 2, bytes.len() - 1] {
            assert!(parse_pack(&key, &id, &bytes[..cut]).is_err());
        }
        let mut huge = bytes.clone();
        let n = huge.len();
        huge[n - 12..n - 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_pack(&key, &id, &huge).is_err());
    }

    #[test]
    fn trailer_with_inconsistent_count_is_refused() {
        let key = MasterKey::generate(Cipher::default());
        let pack = Id([1; 32]);
        let mut plain = 3u32.to_le_bytes().to_vec();
        plain.extend_from_slice(&[0u8; TRAILER_ENTRY_LEN * 2]);
        let sealed = key.seal(&plain);
        assert!(parse_trailer(&key, &pack, &sealed, 1 << 20).is_err());
        // Entry pointing beyond the blob area.
        let mut plain = 1u32.to_le_bytes().to_vec();
        let mut rec = [0u8; TRAILER_ENTRY_LEN];
        rec[34..42].copy_from_slice(&100u64.to_le_bytes());
        rec[42..46].copy_from_slice(&50u32.to_le_bytes());
        rec[46..50].copy_from_slice(&10u32.to_le_bytes());
        plain.extend_from_slice(&rec);
        let sealed = key.seal(&plain);
        assert!(parse_trailer(&key, &pack, &sealed, 149).is_err());
        assert_eq!(parse_trailer(&key, &pack, &sealed, 150).unwrap().len(), 1);
    }

    /// Random garbage and random mutations of a valid pack: errors, never a panic.
    #[test]
    fn hostile_packs_never_panic() {
        let key = MasterKey::generate(Cipher::default());
        let (id, bytes, _) = build(&key, &sample_chunks());
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut bad = bytes.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() % bad.len() as u64) as usize;
                bad[pos] = next() as u8;
            }
            let cut = (next() % (bad.len() as u64 + 1)) as usize;
            let bad = if next() % 4 == 0 {
                &bad[..cut]
            } else {
                &bad[..]
            };
            // Blob-area damage passes here (blobs are checked when opened); trailer damage
            // must not, and nothing may panic.
            let result = parse_pack(&key, &id, bad);
            if bad.len() != bytes.len() {
                assert!(result.is_err());
            }
            let garbage: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
            assert!(parse_pack(&key, &id, &garbage).is_err());
        }
    }

    #[test]
    fn compress_falls_back_to_raw() {
        let (c, out) = compress(1, &[0u8; 4096]);
        assert!(c && out.len() < 100);
        assert_eq!(decompress(&out, 4096).unwrap(), vec![0u8; 4096]);
        assert!(decompress(&out, 4095).is_err());
        assert!(decompress(&out, 4097).is_err());
        let (c, out) = compress(1, b"ab");
        assert!(!c && out == b"ab");
    }
}
