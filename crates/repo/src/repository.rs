//! The repository: configuration, keys, and typed access to the objects in a [`Backend`].
//!
//! `init` writes the key slot first and `config` last, so a location with a `config` object is
//! always a complete repository (a crashed `init` leaves nothing that `open` mistakes for one).
//! Sealed JSON objects (index files, snapshots) are named by the BLAKE3 of their stored bytes:
//! names never collide, never need coordination between concurrent writers, and damage is
//! detectable without the key.

use std::io::Read;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, LocalBackend, ObjectKind, CONFIG_NAME};
use crate::crypto::{hash, Cipher, Id, KdfParams, KeySlot, MasterKey};
use crate::index::{Index, IndexFile, IndexPack, Location};
use crate::pack::{self, BlobEntry, PackWriter};
use crate::{Error, Result};

/// `format` of every hyperkeep repository's config.
pub const FORMAT_NAME: &str = "hyperkeep-repository";
/// The newest repository format version this build reads and writes (`init` writes the oldest
/// version that describes the new repository: see `format_version_for`).
pub const FORMAT_VERSION: u32 = 2;
/// Default chunk size of disks and files (1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Default target size of packs (32 MiB).
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;
/// Smallest and largest chunk sizes a config may declare.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Metadata blobs (chunk-table tree blobs) are at most this big, whatever the chunk size.
pub const MAX_METADATA_BLOB: u32 = 1 << 20;
/// Largest decompressed sealed-JSON object we accept (a prune-written index of a very large
/// repository is hundreds of MiB of JSON; more than this is damage, not data).
const MAX_JSON_LEN: u64 = 4 << 30;
/// A real config is a few hundred bytes.
const MAX_CONFIG_LEN: u64 = 64 << 10;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The `config` object (plaintext JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version; readers refuse newer ones.
    pub version: u32,
    /// Random id of this repository (32 hex digits).
    pub id: String,
    /// Chunk size of disks and files, in bytes.
    pub chunk_size: u32,
    /// Target pack size, in bytes.
    pub pack_size: u64,
    /// Always `zstd`.
    pub compression: String,
    pub compression_level: i32,
    /// A [`Cipher`] name: `xaes-256-gcm` (version 2) or `xchacha20poly1305` (versions 1, 2).
    pub encryption: String,
    /// RFC 3339, UTC.
    pub created: String,
}

impl Config {
    fn validate(&self) -> std::result::Result<(), String> {
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(format!(
                "chunk size {} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if !(1 << 20..=1 << 30).contains(&self.pack_size) {
            return Err(format!(
                "pack size {} is not between 1 MiB and 1 GiB",
                self.pack_size
            ));
        }
        if self.compression != "zstd" || !(-7..=22).contains(&self.compression_level) {
            return Err(format!(
                "unsupported compression {} level {}",
                self.compression, self.compression_level
            ));
        }
        match Cipher::from_name(&self.encryption) {
            // Version 1 knew only XChaCha20-Poly1305: another name there is damage.
            Some(Cipher::XChaCha20Poly1305) => {}
            Some(_) if self.version >= 2 => {}
            _ => {
                return Err(format!(
                    "unsupported encryption {:?} for format version {}",
                    self.encryption, self.version
                ))
            }
        }
        Ok(())
    }

    /// The cipher objects are sealed with (checked by `validate`).
    pub fn cipher(&self) -> Cipher {
        Cipher::from_name(&self.encryption).unwrap_or_default()
    }
}

/// The oldest format version that can describe a repository sealed with `cipher`: a repository
/// that needs nothing newer stays readable by older hyperkeep builds.
fn format_version_for(cipher: Cipher) -> u32 {
    match cipher {
        Cipher::XChaCha20Poly1305 => 1,
        Cipher::Xaes256Gcm => 2,
    }
}

/// Choices made once, at `init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub pack_size: u64,
    pub compression_level: i32,
    /// argon2id cost of the first key slot; `None` = [`KdfParams::from_env`].
    pub kdf: Option<KdfParams>,
    /// The cipher every object is sealed with.
    pub cipher: Cipher,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            compression_level: 1,
            kdf: None,
            cipher: Cipher::default(),
        }
    }
}

/// A key slot as `key list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeySlotInfo {
    pub id: String,
    pub created: String,
    pub hostname: String,
    pub username: String,
    /// The slot this session opened the repository with.
    pub current: bool,
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    key: MasterKey,
    key_id: String,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.backend.location())
            .field("config", &self.config)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Now, RFC 3339 UTC with microseconds (fixed width, so strings sort as times).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// This machine's host name (`unknown` if it cannot be read).
pub fn local_hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Read and check the `config` object's bytes.
fn parse_config(location: &str, bytes: &[u8]) -> Result<Config> {
    let foreign = || {
        Error::Incompatible(format!(
            "{location} is not a hyperkeep repository (its `config` was written by something else)"
        ))
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| foreign())?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(foreign());
    }
    // The version is checked before the rest: a newer format may have changed any other field.
    let version = value.get("version").and_then(|v| v.as_u64());
    match version {
        Some(v) if v > u64::from(FORMAT_VERSION) => {
            return Err(Error::Incompatible(format!(
                "the repository at {location} was written by a newer hyperkeep (format version \
                 {v}; this build reads up to {FORMAT_VERSION}); upgrade hyperkeep"
            )))
        }
        Some(v) if v >= 1 => {}
        _ => {
            return Err(Error::corrupt(
                CONFIG_NAME,
                format!("format version missing or invalid in {location}"),
            ))
        }
    }
    let config: Config = serde_json::from_value(value)
        .map_err(|e| Error::corrupt(CONFIG_NAME, format!("in {location}: {e}")))?;
    config
        .validate()
        .map_err(|e| Error::corrupt(CONFIG_NAME, format!("in {location}: {e}")))?;
    Ok(config)
}

fn check_password(password: &str) -> Result<()> {
    if password.is_empty() {
        return Err(Error::InvalidArgument(
            "the password is empty; choose a non-empty password".into(),
        ));
    }
    Ok(())
}

impl Repository {
    /// The backend for a repository location given by the user: a directory path today.
    pub fn open_location(location: &str) -> Result<Arc<dyn Backend>> {
        if location.is_empty() {
            return Err(Error::InvalidArgument(
                "no repository given (use --repo or HYPERKEEP_REPOSITORY)".into(),
            ));
        }
        // `scheme:rest` with a scheme longer than one letter (so `C:\…` stays a path).
        if let Some((scheme, _)) = location.split_once(':') {
            if scheme.len() > 1
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
                && !std::path::Path::new(location).exists()
            {
                return Err(Error::InvalidArgument(format!(
                    "repository location {location:?}: {scheme} repositories are not supported \
                     yet; give a local directory path"
                )));
            }
        }
        Ok(Arc::new(LocalBackend::new(location)))
    }

    /// Create a repository. Refuses if one (or anything with a `config`) exists there.
    pub fn init(
        backend: Arc<dyn Backend>,
        password: &str,
        opts: InitOptions,
    ) -> Result<Repository> {
        check_password(password)?;
        let location = backend.location();
        if backend.exists(ObjectKind::Config, CONFIG_NAME)? {
            return Err(Error::InvalidArgument(format!(
                "a repository already exists at {location}; nothing was changed"
            )));
        }
        // Objects without a config: an interrupted init or a damaged repository. A key slot
        // left there would wrap another master key, so never build on top of them.
        for kind in [
            ObjectKind::Key,
            ObjectKind::Index,
            ObjectKind::Snapshot,
            ObjectKind::Pack,
        ] {
            if !backend.list(kind)?.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{location} holds repository objects ({}/…) but no config (an interrupted \
                     init, or a damaged repository); choose another location or empty this one",
                    kind.prefix()
                )));
            }
        }
        let config = Config {
            format: FORMAT_NAME.into(),
            version: format_version_for(opts.cipher),
            id: uuid::Uuid::new_v4().simple().to_string(),
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            compression: "zstd".into(),
            compression_level: opts.compression_level,
            encryption: opts.cipher.name().into(),
            created: now_rfc3339(),
        };
        config.validate().map_err(Error::InvalidArgument)?;
        backend.create_layout()?;
        let key = MasterKey::generate(opts.cipher);
        let slot = KeySlot::create(&key, password, opts.kdf.unwrap_or_else(KdfParams::from_env))?;
        let slot_json = serde_json::to_vec_pretty(&slot).map_err(json_bug)?;
        backend.put(ObjectKind::Key, &slot.id, &slot_json)?;
        let config_json = serde_json::to_vec_pretty(&config).map_err(json_bug)?;
        backend.put(ObjectKind::Config, CONFIG_NAME, &config_json)?;
        Ok(Repository {
            backend,
            config,
            key,
            key_id: slot.id,
        })
    }

    /// Open a repository with a password (tries every key slot).
    pub fn open(backend: Arc<dyn Backend>, password: &str) -> Result<Repository> {
        let location = backend.location();
        // Checked by size first: pointed at the wrong directory, `config` may be anything.
        if let Some(info) = backend.list(ObjectKind::Config)?.first() {
            if info.size > MAX_CONFIG_LEN {
                return Err(Error::Incompatible(format!(
                    "{location} is not a hyperkeep repository (its `config` is {} bytes, not a \
                     hyperkeep configuration)",
                    info.size
                )));
            }
        }
        let config_bytes = match backend.get(ObjectKind::Config, CONFIG_NAME) {
            Ok(b) => b,
            Err(Error::Missing(_)) => return Err(Error::NoRepository(location)),
            Err(e) => return Err(e),
        };
        let config = parse_config(&location, &config_bytes)?;
        let mut slots = backend.list(ObjectKind::Key)?;
        if slots.is_empty() {
            return Err(Error::corrupt(
                "keys",
                format!("the repository at {location} has no key slots; it cannot be opened"),
            ));
        }
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        let mut refused = false;
        let mut damage = None;
        for info in slots {
            let object = ObjectKind::Key.key(&info.name);
            // A slot is tiny; a huge one is damage, not something to read into memory.
            if info.size > 64 << 10 {
                damage.get_or_insert(Error::corrupt(object, "key slot too large"));
                continue;
            }
            let slot = backend.get(ObjectKind::Key, &info.name).and_then(|b| {
                serde_json::from_slice::<KeySlot>(&b)
                    .map_err(|e| Error::corrupt(&object, format!("not a key slot: {e}")))
            });
            let slot = match slot {
                Ok(s) if s.id == info.name => s,
                Ok(_) => {
                    damage.get_or_insert(Error::corrupt(
                        &object,
                        "key slot id does not match its name",
                    ));
                    continue;
                }
                Err(Error::Missing(_)) => continue, // removed meanwhile
                Err(e) => {
                    tracing::warn!("skipping {object}: {e}");
                    damage.get_or_insert(e);
                    continue;
                }
            };
            match slot.unlock(password, config.cipher()) {
                Ok(key) => {
                    return Ok(Repository {
                        backend,
                        config,
                        key,
                        key_id: slot.id,
                    })
                }
                Err(Error::WrongPassword) => refused = true,
                Err(e) => {
                    tracing::warn!("skipping {object}: {e}");
                    damage.get_or_insert(e);
                }
            }
        }
        match damage {
            // Every slot was damaged: saying "wrong password" would send the user the wrong way.
            Some(e) if !refused => Err(e),
            _ => Err(Error::WrongPassword),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The largest raw blob this repository may contain: a chunk, or a metadata blob. Every
    /// decompression is capped by it.
    pub fn max_blob_len(&self) -> u32 {
        self.config.chunk_size.max(MAX_METADATA_BLOB)
    }

    /// Seal a JSON value (zstd-compressed when that pays) and store it under the BLAKE3 of the
    /// stored bytes. Returns that id.
    pub fn save_json<T: Serialize>(&self, kind: ObjectKind, value: &T) -> Result<Id> {
        let json = serde_json::to_vec(value).map_err(json_bug)?;
        // The plaintext is the JSON or a zstd frame of it; JSON never starts with zstd's magic.
        let plain = match zstd::bulk::compress(&json, 3) {
            Ok(c) if c.len() < json.len() => c,
            _ => json,
        };
        let sealed = self.key.seal(&plain);
        let id = hash(&sealed);
        self.backend.put(kind, &id.to_hex(), &sealed)?;
        Ok(id)
    }

    /// Load what [`Repository::save_json`] stored: checks the name (BLAKE3), authenticates,
    /// decompresses (bounded), parses. Any failure is `Error::Corrupt` naming the object
    /// (or `Error::Missing`).
    pub fn load_json<T: DeserializeOwned>(&self, kind: ObjectKind, name: &str) -> Result<T> {
        let object = kind.key(name);
        let sealed = self.backend.get(kind, name)?;
        if hash(&sealed).to_hex() != name.to_ascii_lowercase() {
            return Err(Error::corrupt(
                object,
                "content does not match its name (the object is damaged)",
            ));
        }
        let plain = self.key.open(&sealed).map_err(|_| {
            Error::corrupt(
                &object,
                "fails authentication (damaged, or sealed with another repository's key)",
            )
        })?;
        drop(sealed);
        let parsed = if plain.starts_with(&ZSTD_MAGIC) {
            let decoder = zstd::stream::read::Decoder::new(plain.as_slice())
                .map_err(|e| Error::corrupt(&object, format!("zstd: {e}")))?;
            let limited = std::io::BufReader::new(decoder.take(MAX_JSON_LEN));
            serde_json::from_reader(limited)
        } else {
            serde_json::from_slice(&plain)
        };
        parsed.map_err(|e| Error::corrupt(&object, format!("not the expected JSON: {e}")))
    }

    /// Add a key slot for `password`; returns its id.
    pub fn add_key(&self, password: &str) -> Result<String> {
        self.add_key_with(password, KdfParams::from_env())
    }

    /// [`Repository::add_key`] with explicit argon2id costs.
    pub fn add_key_with(&self, password: &str, params: KdfParams) -> Result<String> {
        check_password(password)?;
        let slot = KeySlot::create(&self.key, password, params)?;
        let json = serde_json::to_vec_pretty(&slot).map_err(json_bug)?;
        self.backend.put(ObjectKind::Key, &slot.id, &json)?;
        Ok(slot.id)
    }

    /// Remove a key slot by id (or a unique prefix of at least 4 digits). Refuses the slot
    /// this session opened with, and the last slot.
    pub fn remove_key(&self, id: &str) -> Result<()> {
        let names: Vec<String> = self
            .backend
            .list(ObjectKind::Key)?
            .into_iter()
            .map(|i| i.name)
            .collect();
        let matches: Vec<&String> = if names.iter().any(|n| n == id) {
            names.iter().filter(|n| *n == id).collect()
        } else if id.len() >= 4 {
            names.iter().filter(|n| n.starts_with(id)).collect()
        } else {
            Vec::new()
        };
        let target = match matches.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(Error::NotFound(format!(
                    "no key {id:?} in the repository (see `hyperkeep key list`)"
                )))
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "key id prefix {id:?} is ambiguous; give more digits"
                )))
            }
        };
        if target == self.key_id {
            return Err(Error::InvalidArgument(format!(
                "key {target} is the one this session opened the repository with; open the \
                 repository with another password to remove it"
            )));
        }
        if names.len() <= 1 {
            return Err(Error::InvalidArgument(
                "cannot remove the repository's last key".into(),
            ));
        }
        self.backend.delete(ObjectKind::Key, &target)
    }

    /// All key slots (damaged ones are skipped with a warning).
    pub fn list_keys(&self) -> Result<Vec<KeySlotInfo>> {
        let mut out = Vec::new();
        for info in self.backend.list(ObjectKind::Key)? {
            if info.size > 64 << 10 {
                tracing::warn!("key slot {} is too large; skipped", info.name);
                continue;
            }
            let slot = match self.backend.get(ObjectKind::Key, &info.name) {
                Ok(b) => serde_json::from_slice::<KeySlot>(&b),
                Err(Error::Missing(_)) => continue,
                Err(e) => return Err(e),
            };
            match slot {
                Ok(s) => out.push(KeySlotInfo {
                    current: s.id == self.key_id,
                    id: s.id,
                    created: s.created,
                    hostname: s.hostname,
                    username: s.username,
                }),
                Err(e) => tracing::warn!("key slot {} is damaged: {e}", info.name),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The id of the key slot this session opened with.
    pub fn current_key_id(&self) -> &str {
        &self.key_id
    }

    /// All index files merged. A damaged index file is an error naming it.
    pub fn load_index(&self) -> Result<Index> {
        let (index, mut errors) = self.load_index_inner(true)?;
        match errors.pop() {
            Some((_, e)) => Err(e),
            None => Ok(index),
        }
    }

    /// All readable index files merged, plus (object key, error) for each one that is not
    /// (for `check`, which reports them and goes on).
    pub fn load_index_lenient(&self) -> Result<(Index, Vec<(String, Error)>)> {
        self.load_index_inner(false)
    }

    fn load_index_inner(&self, stop_at_first: bool) -> Result<(Index, Vec<(String, Error)>)> {
        let mut index = Index::new();
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // An index file can vanish between listing and reading when a concurrent prune has
        // replaced it; its replacement exists by then, so list again to pick it up.
        for _round in 0..3 {
            let mut names: Vec<String> = self
                .backend
                .list(ObjectKind::Index)?
                .into_iter()
                .map(|i| i.name)
                .filter(|n| !seen.contains(n))
                .collect();
            names.sort();
            let mut vanished = false;
            for name in names {
                seen.insert(name.clone());
                match self.load_json::<IndexFile>(ObjectKind::Index, &name) {
                    Ok(file) => index.add_file_unsorted(&file),
                    Err(Error::Missing(_)) => vanished = true,
                    Err(e) => {
                        errors.push((ObjectKind::Index.key(&name), e));
                        if stop_at_first {
                            index.finalize();
                            return Ok((index, errors));
                        }
                    }
                }
            }
            if !vanished {
                break;
            }
        }
        index.finalize();
        Ok((index, errors))
    }

    /// Read one blob: locate it, fetch its bytes, authenticate, decompress (capped by the
    /// index's raw length and [`Repository::max_blob_len`]), and check its keyed hash. When
    /// several packs hold the blob, a damaged copy falls back to the next one.
    pub fn read_chunk(&self, index: &Index, id: &Id) -> Result<Vec<u8>> {
        let mut first_error = None;
        for loc in index.lookup_all(id) {
            match self.read_blob_at(id, &loc) {
                Ok(raw) => return Ok(raw),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::Missing(format!("blob {id} (no index lists it)"))))
    }

    /// Read blob `id` from one given location (check, prune's repacking).
    pub fn read_blob_at(&self, id: &Id, loc: &Location) -> Result<Vec<u8>> {
        let sealed = self.backend.get_range(
            ObjectKind::Pack,
            &loc.pack.to_hex(),
            loc.offset,
            u64::from(loc.stored_len),
        )?;
        pack::open_blob(
            &self.key,
            &loc.pack,
            &loc.entry(*id),
            &sealed,
            self.max_blob_len(),
        )
    }

    /// An index file built from the trailers of every pack in the repository (the index is a
    /// cache: this recovers it). Returns it with (object key, error) for each pack whose trailer
    /// could not be read.
    pub fn index_from_packs(&self) -> Result<(IndexFile, Vec<(String, Error)>)> {
        let mut file = IndexFile::default();
        let mut errors = Vec::new();
        let mut packs = self.backend.list(ObjectKind::Pack)?;
        packs.sort_by(|a, b| a.name.cmp(&b.name));
        for info in packs {
            let object = ObjectKind::Pack.key(&info.name);
            let result = Id::from_hex(&info.name)
                .map_err(|_| Error::corrupt(&object, "name is not a pack id"))
                .and_then(|id| Ok((id, self.read_pack_trailer(&id, info.size)?)));
            match result {
                Ok((id, blobs)) => file.packs.push(IndexPack { id, blobs }),
                Err(Error::Missing(_)) => {}
                Err(e) => errors.push((object, e)),
            }
        }
        Ok((file, errors))
    }

    /// A pack writer sized for this repository.
    pub fn pack_writer(&self) -> PackWriter {
        PackWriter::new(self.config.pack_size)
    }

    /// Finish and store a pack. Returns (pack id, pack size, blobs).
    pub fn save_pack(&self, writer: PackWriter) -> Result<SavedPack> {
        self.save_pack_reuse(writer).map(|(saved, _)| saved)
    }

    /// Like [`Repository::save_pack`], also handing back the pack's buffer for
    /// [`PackWriter::with_buffer`].
    pub fn save_pack_reuse(&self, writer: PackWriter) -> Result<(SavedPack, Vec<u8>)> {
        // In place: the pack starts 4096-aligned in the buffer, so the local backend writes it
        // with O_DIRECT without copying it into its bounce buffer.
        let (id, bytes, start, entries) = writer.finish_in_place(&self.key);
        let pack = &bytes[start..];
        self.backend.put(ObjectKind::Pack, &id.to_hex(), pack)?;
        Ok(((id, pack.len() as u64, entries), bytes))
    }

    /// Store an index file. Returns its id.
    pub fn save_index(&self, file: &IndexFile) -> Result<Id> {
        self.save_json(ObjectKind::Index, file)
    }

    /// A pack's blobs from its trailer (`size` = its real size, from listing).
    pub fn read_pack_trailer(&self, pack: &Id, size: u64) -> Result<Vec<BlobEntry>> {
        pack::read_pack_trailer(self.backend.as_ref(), &self.key, pack, size)
    }
}

/// What [`Repository::save_pack`] stored: (pack id, pack size, blobs).
pub type SavedPack = (Id, u64, Vec<BlobEntry>);

fn json_bug(e: serde_json::Error) -> Error {
    Error::InvalidArgument(format!("cannot encode as JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{seal_blob, BlobKind};

    fn fast() -> InitOptions {
        InitOptions {
            kdf: Some(KdfParams::FAST_FOR_TESTS),
            ..InitOptions::default()
        }
    }

    fn new_repo(dir: &std::path::Path) -> Repository {
        let b = Repository::open_location(dir.to_str().unwrap()).unwrap();
        Repository::init(b, "pw", fast()).unwrap()
    }

    #[test]
    fn init_open_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let loc = dir.path().join("r");
        let b = Repository::open_location(loc.to_str().unwrap()).unwrap();
        match Repository::open(b.clone(), "pw") {
            Err(Error::NoRepository(l)) => assert!(l.contains("r")),
            other => panic!("{other:?}"),
        }
        // A plain file where the repository should be: no repository, not an I/O puzzle.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let fb = Repository::open_location(file.to_str().unwrap()).unwrap();
        assert!(matches!(
            Repository::open(fb, "pw"),
            Err(Error::NoRepository(_))
        ));
        // A directory with an unrelated big `config`: foreign, and not read whole.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("config"), vec![b'{'; 1 << 20]).unwrap();
        let ob = Repository::open_location(other.to_str().unwrap()).unwrap();
        assert!(matches!(
            Repository::open(ob.clone(), "pw"),
            Err(Error::Incompatible(_))
        ));
        // init refuses a non-empty directory that is not a repository.
        std::fs::remove_file(other.join("config")).unwrap();
        std::fs::write(other.join("notes.txt"), b"mine").unwrap();
        let msg = Repository::init(ob, "pw", fast()).unwrap_err().to_string();
        assert!(msg.contains("not empty"), "{msg}");
        assert!(!other.join("keys").exists());

        let repo = Repository::init(b.clone(), "pw", fast()).unwrap();
        assert_eq!(repo.config().version, 2);
        assert_eq!(repo.config().encryption, "xaes-256-gcm");
        assert_eq!(repo.key().cipher(), Cipher::Xaes256Gcm);
        assert_eq!(repo.config().chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(matches!(
            Repository::init(b.clone(), "pw", fast()),
            Err(Error::InvalidArgument(_))
        ));
        let again = Repository::open(b.clone(), "pw").unwrap();
        assert_eq!(again.current_key_id(), repo.current_key_id());
        assert_eq!(again.key().chunk_id(b"x"), repo.key().chunk_id(b"x"));
        assert!(matches!(
            Repository::open(b.clone(), "nope"),
            Err(Error::WrongPassword)
        ));
        let dbg = format!("{again:?}");
        assert!(
            !dbg.contains("MasterKey") && !dbg.contains(" key:") && !dbg.contains("enc:"),
            "{dbg}"
        );
        assert!(matches!(
            Repository::init(
                Repository::open_location(dir.path().join("x").to_str().unwrap()).unwrap(),
                "",
                fast()
            ),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn an_xchacha_repository_is_format_version_1_and_seals_with_xchacha() {
        let dir = tempfile::tempdir().unwrap();
        let b = Repository::open_location(dir.path().to_str().unwrap()).unwrap();
        let opts = InitOptions {
            cipher: Cipher::XChaCha20Poly1305,
            ..fast()
        };
        let repo = Repository::init(b.clone(), "pw", opts).unwrap();
        assert_eq!(repo.config().version, 1);
        assert_eq!(repo.config().encryption, "xchacha20poly1305");
        let sealed = repo.key().seal(b"object");
        let again = Repository::open(b, "pw").unwrap();
        assert_eq!(again.key().cipher(), Cipher::XChaCha20Poly1305);
        assert_eq!(again.key().open(&sealed).unwrap(), b"object");
    }

    #[test]
    fn foreign_and_newer_configs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = new_repo(dir.path());
        let b = repo.backend().clone();
        let good = b.get(ObjectKind::Config, CONFIG_NAME).unwrap();

        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        let newer = FORMAT_VERSION + 1;
        v["version"] = newer.into();
        b.put(
            ObjectKind::Config,
            CONFIG_NAME,
            &serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
        let msg = Repository::open(b.clone(), "pw").unwrap_err().to_string();
        assert!(
            msg.contains("newer hyperkeep")
                && msg.contains("upgrade")
                && msg.contains(&format!("version {newer}")),
            "{msg}"
        );
        // Version 1 knew only XChaCha20-Poly1305: an XAES-256-GCM config claiming version 1 is
        // damaged, and so is an unknown cipher.
        for (version, encryption) in [(1, "xaes-256-gcm"), (2, "rot13")] {
            let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
            v["version"] = version.into();
            v["encryption"] = encryption.into();
            b.put(
                ObjectKind::Config,
                CONFIG_NAME,
                &serde_json::to_vec(&v).unwrap(),
            )
            .unwrap();
            match Repository::open(b.clone(), "pw") {
                Err(Error::Corrupt { detail, .. }) => {
                    assert!(detail.contains("unsupported encryption"), "{detail}")
                }
                other => panic!("{other:?}"),
            }
        }

        for foreign in [
            &b"\x01\x02binary"[..],
            b"{\"version\":1}",
            b"{\"format\":\"restic\",\"version\":1}",
        ] {
            b.put(ObjectKind::Config, CONFIG_NAME, foreign).unwrap();
            match Repository::open(b.clone(), "pw") {
                Err(Error::Incompatible(m)) => {
                    assert!(m.contains("not a hyperkeep repository"), "{m}");
                    assert!(m.contains(&b.location()), "{m}");
                }
                other => panic!("{other:?}"),
            }
        }
        // Ours, but with an impossible chunk size: damaged.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["chunk_size"] = 12345.into();
        b.put(
            ObjectKind::Config,
            CONFIG_NAME,
            &serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            Repository::open(b.clone(), "pw"),
            Err(Error::Corrupt { .. })
        ));
        b.put(ObjectKind::Config, CONFIG_NAME, &good).unwrap();
        Repository::open(b, "pw").unwrap();
    }

    #[test]
    fn key_slots_add_remove_list() {
        let dir = tempfile::tempdir().unwrap();
        let repo = new_repo(dir.path());
        let first = repo.current_key_id().to_string();
        assert!(matches!(
            repo.remove_key(&first),
            Err(Error::InvalidArgument(_))
        ));
        let second = repo
            .add_key_with("other", KdfParams::FAST_FOR_TESTS)
            .unwrap();
        let keys = repo.list_keys().unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().any(|k| k.id == first && k.current));
        assert!(keys.iter().any(|k| k.id == second && !k.current));

        let b = repo.backend().clone();
        let via_second = Repository::open(b.clone(), "other").unwrap();
        assert_eq!(via_second.current_key_id(), second);
        assert_eq!(via_second.key().chunk_id(b"z"), repo.key().chunk_id(b"z"));
        // The second session may remove the first key (by prefix), not its own.
        assert!(matches!(
            via_second.remove_key(&second),
            Err(Error::InvalidArgument(_))
        ));
        via_second.remove_key(&first[..6]).unwrap();
        assert!(matches!(
            Repository::open(b.clone(), "pw"),
            Err(Error::WrongPassword)
        ));
        assert!(matches!(
            via_second.remove_key("ffffffffffffffff"),
            Err(Error::NotFound(_))
        ));
        assert_eq!(via_second.list_keys().unwrap().len(), 1);

        // A damaged slot next to a good one: the good one still opens.
        b.put(ObjectKind::Key, "0000000000000000", b"garbage")
            .unwrap();
        Repository::open(b.clone(), "other").unwrap();
        assert!(matches!(
            Repository::open(b.clone(), "bad"),
            Err(Error::WrongPassword)
        ));
        // Only damaged slots: the error says damage, not wrong password.
        b.delete(ObjectKind::Key, &second).unwrap();
        assert!(matches!(
            Repository::open(b, "other"),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn sealed_json_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let repo = new_repo(dir.path());
        let value: Vec<String> = (0..1000).map(|i| format!("entry number {i}")).collect();
        let id = repo.save_json(ObjectKind::Snapshot, &value).unwrap();
        let back: Vec<String> = repo.load_json(ObjectKind::Snapshot, &id.to_hex()).unwrap();
        assert_eq!(back, value);
        let small = repo.save_json(ObjectKind::Snapshot, &1u8).unwrap();
        assert_eq!(
            repo.load_json::<u8>(ObjectKind::Snapshot, &small.to_hex())
                .unwrap(),
            1
        );

        let b = repo.backend();
        let mut bytes = b.get(ObjectKind::Snapshot, &id.to_hex()).unwrap();
        bytes[30] ^= 1;
        b.put(ObjectKind::Snapshot, &id.to_hex(), &bytes).unwrap();
        let err = repo
            .load_json::<Vec<String>>(ObjectKind::Snapshot, &id.to_hex())
            .unwrap_err();
        assert!(
            err.to_string().contains(&format!("snapshots/{id}")),
            "{err}"
        );
        // Renamed so the name matches again: authentication still refuses it.
        let renamed = hash(&bytes);
        b.put(ObjectKind::Snapshot, &renamed.to_hex(), &bytes)
            .unwrap();
        assert!(matches!(
            repo.load_json::<Vec<String>>(ObjectKind::Snapshot, &renamed.to_hex()),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            repo.load_json::<u8>(ObjectKind::Snapshot, &Id([3; 32]).to_hex()),
            Err(Error::Missing(_))
        ));
    }

    #[test]
    fn chunks_through_packs_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let repo = new_repo(dir.path());
        let chunks: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let mut w = repo.pack_writer();
        for c in &chunks {
            let (compressed, sealed) = seal_blob(repo.key(), repo.config().compression_level, c);
            w.add(
                BlobEntry {
                    id: repo.key().chunk_id(c),
                    kind: BlobKind::Data,
                    compressed,
                    offset: 0,
                    stored_len: 0,
                    raw_len: c.len() as u32,
                },
                sealed,
            );
        }
        let (pack, size, entries) = repo.save_pack(w).unwrap();
        assert_eq!(repo.read_pack_trailer(&pack, size).unwrap(), entries);
        let file = IndexFile {
            packs: vec![crate::index::IndexPack {
                id: pack,
                blobs: entries.clone(),
            }],
            supersedes: vec![],
        };
        repo.save_index(&file).unwrap();
        repo.save_index(&file).unwrap(); // a duplicate file (same content, new nonce)
        let index = repo.load_index().unwrap();
        assert_eq!(index.len(), chunks.len());
        for c in &chunks {
            assert_eq!(
                &repo.read_chunk(&index, &repo.key().chunk_id(c)).unwrap(),
                c
            );
        }
        assert!(matches!(
            repo.read_chunk(&index, &Id([5; 32])),
            Err(Error::Missing(_))
        ));

        // Damage one blob in the pack: reading it fails naming pack and blob; others still read.
        let name = pack.to_hex();
        let mut bytes = repo.backend().get(ObjectKind::Pack, &name).unwrap();
        let e = entries[3];
        bytes[e.offset as usize + 30] ^= 4;
        repo.backend().put(ObjectKind::Pack, &name, &bytes).unwrap();
        let err = repo.read_chunk(&index, &e.id).unwrap_err().to_string();
        assert!(err.contains(&name) && err.contains(&e.id.to_hex()), "{err}");
        assert_eq!(repo.read_chunk(&index, &entries[4].id).unwrap(), chunks[4]);

        // The index can be rebuilt from the packs alone.
        let (rebuilt, errs) = repo.index_from_packs().unwrap();
        assert!(errs.is_empty());
        assert_eq!(rebuilt.packs.len(), 1);
        assert_eq!(rebuilt.packs[0].blobs, entries);

        // A second copy of the damaged blob in another pack: reads fall back to it.
        let mut w = repo.pack_writer();
        let (compressed, sealed) = seal_blob(repo.key(), 1, &chunks[3]);
        w.add(
            BlobEntry {
                id: e.id,
                kind: BlobKind::Data,
                compressed,
                offset: 0,
                stored_len: 0,
                raw_len: chunks[3].len() as u32,
            },
            sealed,
        );
        let (pack2, _, entries2) = repo.save_pack(w).unwrap();
        let mut index2 = index.clone();
        index2.insert_pack(pack2, &entries2);
        assert_eq!(repo.read_chunk(&index2, &e.id).unwrap(), chunks[3]);

        // A damaged index file: load_index names it; the lenient loader skips it.
        let bad = repo.save_index(&file).unwrap();
        let mut ib = repo
            .backend()
            .get(ObjectKind::Index, &bad.to_hex())
            .unwrap();
        ib[45] ^= 1;
        repo.backend()
            .put(ObjectKind::Index, &bad.to_hex(), &ib)
            .unwrap();
        let err = repo.load_index().unwrap_err().to_string();
        assert!(err.contains(&format!("index/{bad}")), "{err}");
        let (ix, errors) = repo.load_index_lenient().unwrap();
        assert_eq!(ix.len(), chunks.len());
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn interrupted_init_is_not_built_upon() {
        let dir = tempfile::tempdir().unwrap();
        let b = Repository::open_location(dir.path().to_str().unwrap()).unwrap();
        b.create_layout().unwrap();
        // A key slot without a config: what an init killed between its two writes leaves.
        let slot = KeySlot::create(
            &MasterKey::generate(Cipher::default()),
            "pw",
            KdfParams::FAST_FOR_TESTS,
        )
        .unwrap();
        b.put(
            ObjectKind::Key,
            &slot.id,
            &serde_json::to_vec(&slot).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            Repository::open(b.clone(), "pw"),
            Err(Error::NoRepository(_))
        ));
        let msg = Repository::init(b, "pw", fast()).unwrap_err().to_string();
        assert!(msg.contains("interrupted init"), "{msg}");
    }

    #[test]
    fn location_schemes() {
        assert!(Repository::open_location("").is_err());
        assert!(matches!(
            Repository::open_location("s3:bucket/x"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(Repository::open_location("/tmp/some/dir").is_ok());
        assert!(Repository::open_location("C:\\repo").is_ok());
    }
}
