/// Errors of fitting and scoring. Input problems carry the offending detail; nothing here panics on input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad vectors (wrong width, NaN/Inf, malformed buffer, empty batch).
    #[error(transparent)]
    Input(#[from] actwatch_core::Error),
    /// An option out of its range, or options that do not fit together.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// Too little data to fit or calibrate what was asked.
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    /// A numerical routine failed (e.g. an eigendecomposition did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
