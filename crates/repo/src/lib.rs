//! hyperkeep's backup repository: deduplicated, compressed, encrypted VM snapshots.
//!
//! Map of the crate (data flows top to bottom):
//! - [`backend`]: where objects live. One trait ([`backend::Backend`]: put/get/list/delete of
//!   whole objects by key) with the local-directory implementation; an S3 one comes later.
//!   Nothing above it relies on rename, atime or listing order.
//! - [`crypto`]: the master key (encryption key + chunk-id key), XAES-256-GCM or
//!   XChaCha20-Poly1305 sealing of every object, argon2id-wrapped key slots (`keys/`).
//! - [`repository`]: [`repository::Repository`]: init/open (config, key slots, format version),
//!   typed access to packs, indexes, snapshots and locks.
//! - [`pack`]: pack files (many encrypted blobs + an encrypted, authenticated trailer listing them,
//!   so the index can always be rebuilt from packs) and the pack writer.
//! - [`index`]: chunk id -> (pack, offset, length) as a sorted in-memory table (56 bytes per
//!   entry), index files.
//! - [`snapshot`]: the snapshot manifest (one VM at one point in time: disks as chunk tables,
//!   other files), ids and abbreviation, `latest`.
//! - [`lock`]: shared (backup) and exclusive (prune) locks with refresh and staleness.
//! - [`backup`]: the parallel backup pipeline (read allocated ranges -> zero check -> keyed BLAKE3
//!   -> zstd -> encrypt -> packs), incrementals from a change list.
//! - [`restore`]: a snapshot disk as a [`vdisk::VirtualDisk`] ([`restore::SnapshotDisk`]), and
//!   restoring whole snapshots into a directory.
//! - [`forget`], [`prune`], [`check`], [`stats`], [`diff`]: maintenance, one module per command.
//! - [`error`]: the error type.
//!
//! Why our own format rather than restic's or borg's: their stores chunk files, not disks; we
//! need fixed, disk-aligned chunks with a dense per-disk table (random access for mounting and
//! granular restore, change-list incrementals), keyed chunk ids, and a layout that needs
//! nothing from storage but put/get/list/delete of whole objects.

pub mod backend;
pub mod backup;
pub mod check;
pub mod crypto;
pub mod diff;
pub mod error;
pub mod forget;
pub mod index;
pub mod lock;
pub mod pack;
pub mod prune;
pub mod repository;
pub mod restore;
pub mod snapshot;
pub mod stats;

pub use error::{Error, Result};
