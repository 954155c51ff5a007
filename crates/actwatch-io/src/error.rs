use std::path::PathBuf;

/// Errors of reading and writing files. Every problem with an input names the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be opened, listed, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is not valid Parquet (truncated, corrupt, or not Parquet at all), or could not be
    /// decoded or written as such.
    #[error("{}: invalid or unreadable Parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    /// A file is not a valid Arrow IPC file (truncated, corrupt, a block outside the file), or
    /// could not be decoded as one.
    #[error("{}: invalid or unreadable Arrow IPC file: {source}", path.display())]
    Ipc {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
    /// An Arrow compute or layout error not tied to one file.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A required column is absent.
    #[error("{}: no column {column:?} (available: {})", path.display(), available.join(", "))]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: Vec<String>,
    },
    /// A column has a type the reader cannot use.
    #[error("{}: column {column:?} has type {found}, expected {expected}", path.display())]
    BadColumnType {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },
    /// A vector's width differs from the width already seen for its site.
    #[error(
        "{}: row {row}: vector for site {site:?} has width {got}, but this site's width is {expected}",
        path.display()
    )]
    WidthMismatch {
        path: PathBuf,
        site: String,
        expected: usize,
        got: usize,
        row: u64,
    },
    /// A vector has no components at all.
    #[error("{}: row {row}: empty vector in column {column:?}", path.display())]
    EmptyVector {
        path: PathBuf,
        column: String,
        row: u64,
    },
    /// A NaN or infinite vector component (`row` is the row index within the file).
    #[error("{}: row {row}: non-finite value in vector component {component}", path.display())]
    NonFinite {
        path: PathBuf,
        row: u64,
        component: usize,
    },
    /// A null where a value is required (a trace id, a site, a vector or one of its components).
    #[error("{}: row {row}: null value in column {column:?}", path.display())]
    NullValue {
        path: PathBuf,
        column: String,
        row: u64,
    },
    /// A value a column holds that the reader cannot use (e.g. a label that is not 0 or 1).
    #[error("{}: row {row}: column {column:?}: {message}", path.display())]
    BadValue {
        path: PathBuf,
        column: String,
        row: u64,
        message: String,
    },
    /// Labelled examples that the probes refuse (e.g. a computation labelled both ways).
    #[error("{}: labelled examples: {source}", path.display())]
    Examples {
        path: PathBuf,
        source: actwatch_detect::Error,
    },
    /// A file's key-value metadata entry `key` is malformed.
    #[error("{}: metadata {key:?}: {message}", path.display())]
    Metadata {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    /// Data that cannot go into the file being written (e.g. a width it does not hold).
    #[error("{}: cannot write: {message}", path.display())]
    Write { path: PathBuf, message: String },
    /// No Parquet files were found under the given paths.
    #[error("no input: {0}")]
    NoInput(String),
    /// A monitor artifact is corrupt, half-written or of an unknown version.
    #[error("bad monitor artifact: {0}")]
    Artifact(String),
    #[error(transparent)]
    Detect(#[from] actwatch_detect::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bincode: {0}")]
    Bincode(#[from] bincode::Error),
    #[error(transparent)]
    Core(#[from] actwatch_core::Error),
}

impl Error {
    /// The file this error is about, where there is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Error::Io { path, .. }
            | Error::Parquet { path, .. }
            | Error::Ipc { path, .. }
            | Error::MissingColumn { path, .. }
            | Error::BadColumnType { path, .. }
            | Error::WidthMismatch { path, .. }
            | Error::EmptyVector { path, .. }
            | Error::NonFinite { path, .. }
            | Error::NullValue { path, .. }
            | Error::BadValue { path, .. }
            | Error::Examples { path, .. }
            | Error::Metadata { path, .. }
            | Error::Write { path, .. } => Some(path),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ipc(path: impl Into<PathBuf>, source: arrow::error::ArrowError) -> Self {
        Error::Ipc {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
