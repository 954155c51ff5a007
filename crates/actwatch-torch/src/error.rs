use std::path::PathBuf;

/// Errors of capture and of the torch backend. Problems with a file name the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The inputs Parquet is unusable: a missing or mistyped column, a null, ragged ids and mask.
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    /// The TorchScript file is missing, does not load, fails to run, or breaks the output contract.
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    /// Reading or writing Parquet (the error names the file).
    #[error(transparent)]
    Io(#[from] actwatch_io::Error),
    /// A bad option (sites, batch size, device).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The server refused or dropped the ingest.
    #[error("server {address}: {message}")]
    Server { address: String, message: String },
    /// A libtorch operation failed outside the model (copying, scoring).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Detect(#[from] actwatch_detect::Error),
    /// Traces that break a batch's invariants (a bug of capture, never input).
    #[error(transparent)]
    Core(#[from] actwatch_core::Error),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl Error {
    pub(crate) fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
