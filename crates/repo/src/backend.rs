//! Object storage. The repository is a set of immutable objects addressed by key
//! (`config`, `keys/<id>`, `data/<2 hex>/<pack id>`, `index/<id>`, `snapshots/<id>`,
//! `locks/<id>`). Every object is written once, whole, and never modified; deletes are the only
//! other change. That is all an object store offers, so the local directory offers no more.

use crate::Result;

/// Kinds of objects, each under its own key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    Lock,
}

impl ObjectKind {
    pub fn prefix(self) -> &'static str {
        match self {
            ObjectKind::Config => "",
            ObjectKind::Key => "keys",
            ObjectKind::Pack => "data",
            ObjectKind::Index => "index",
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Lock => "locks",
        }
    }
}

/// One object as listed: its name (the id, without prefix) and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
}

/// Storage of whole objects. Implementations must make `put` atomic (readers see the whole
/// object or nothing) and durable when it returns; `list` order is unspecified.
pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;
    /// Store `data` as object `name` of `kind`. Writing an existing name replaces it whole.
    fn put(&self, kind: ObjectKind, name: &str, data: &[u8]) -> Result<()>;
    /// Read a whole object. `Error::Missing` if absent.
    fn get(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>>;
    /// Read `length` bytes at `offset` of an object.
    fn get_range(&self, kind: ObjectKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// All objects of a kind.
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;
    /// Remove an object; removing a missing object is not an error.
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()>;
    /// Whether the repository location exists at all (for `init` and clear errors).
    fn exists(&self, kind: ObjectKind, name: &str) -> Result<bool>;
}

/// A repository in a local directory (the embedded default).
pub struct LocalBackend {
    pub root: std::path::PathBuf,
}
