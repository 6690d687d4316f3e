//! One error type for every disk format. Messages name the file or structure and, where the user
//! can do something about it, what to do.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error, with what we were doing at the time.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The file's content violates its format: it is damaged or was not written by a
    /// conforming implementation.
    #[error("{path}corrupt {format} file: {detail}", path = path_prefix(.path))]
    Corrupt {
        format: &'static str,
        path: Option<PathBuf>,
        detail: String,
    },
    /// Valid, but uses a feature we do not implement (yet).
    #[error("{path}unsupported {format} file: {detail}", path = path_prefix(.path))]
    Unsupported {
        format: &'static str,
        path: Option<PathBuf>,
        detail: String,
    },
    /// The parent of a differencing disk cannot be found or does not match.
    #[error("{0}")]
    Parent(String),
    /// A caller passed something that cannot work (a read past the end, a bad block size...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A write to a disk that was opened read-only, or to a format that cannot be written.
    #[error("{0}")]
    ReadOnly(String),
}

fn path_prefix(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(format: &'static str, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            format,
            path: None,
            detail: detail.into(),
        }
    }

    pub fn unsupported(format: &'static str, detail: impl Into<String>) -> Self {
        Error::Unsupported {
            format,
            path: None,
            detail: detail.into(),
        }
    }

    /// Attach the file name to a format error that was raised while parsing bytes.
    pub fn with_path(self, p: impl Into<PathBuf>) -> Self {
        match self {
            Error::Corrupt {
                format,
                path: None,
                detail,
            } => Error::Corrupt {
                format,
                path: Some(p.into()),
                detail,
            },
            Error::Unsupported {
                format,
                path: None,
                detail,
            } => Error::Unsupported {
                format,
                path: Some(p.into()),
                detail,
            },
            other => other,
        }
    }
}
