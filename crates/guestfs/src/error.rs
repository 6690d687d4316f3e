//! Errors: what is wrong, where, and never a panic on hostile images.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Disk(#[from] vdisk::Error),
    /// The filesystem's structures are damaged or hostile (loops, out-of-volume runs, ...).
    #[error("corrupt {fs} filesystem: {detail}")]
    Corrupt { fs: &'static str, detail: String },
    /// Valid, but a feature we cannot read (we say so instead of returning wrong bytes).
    #[error("unsupported {fs} feature: {detail}")]
    Unsupported { fs: &'static str, detail: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not a directory: {0}")]
    NotADirectory(String),
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    pub fn corrupt(fs: &'static str, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            fs,
            detail: detail.into(),
        }
    }
    pub fn unsupported(fs: &'static str, detail: impl Into<String>) -> Self {
        Error::Unsupported {
            fs,
            detail: detail.into(),
        }
    }
}
