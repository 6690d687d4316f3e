//! Errors. Messages say what is wrong and what to do; they never contain key material.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// No repository at the location (no `config` object).
    #[error("no hyperkeep repository at {0} (create one with `hyperkeep init`)")]
    NoRepository(String),
    /// `config` exists but is not ours, or is of a newer format version.
    #[error("{0}")]
    Incompatible(String),
    /// No key slot opens with the given password.
    #[error("wrong password: no key in the repository opens with it")]
    WrongPassword,
    /// An object failed authentication, its hash, or its structure.
    #[error("damaged repository object {object}: {detail}")]
    Corrupt { object: String, detail: String },
    /// An object the repository refers to is missing.
    #[error("missing repository object {0}")]
    Missing(String),
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Disk(#[from] vdisk::Error),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            detail: detail.into(),
        }
    }
}
