use std::fmt;

/// Errors raised on the shared data types: every one is a problem with the input, never a bug.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// A vector (or batch) does not have the width the site or monitor expects.
    #[error("wrong vector width: expected {expected}, got {got}")]
    WidthMismatch { expected: usize, got: usize },
    /// A value is NaN or infinite.
    #[error("non-finite value ({value}) in row {row}, component {component}")]
    NonFinite {
        row: usize,
        component: usize,
        value: FloatDisplay,
    },
    /// A buffer's length does not match its declared shape or dtype.
    #[error("malformed buffer: {0}")]
    Malformed(String),
    /// A provenance field that cannot be stored (unknown, too long, control characters).
    #[error("invalid provenance: {0}")]
    Provenance(String),
    /// An empty batch or reference set where data is required.
    #[error("empty input: {0}")]
    Empty(String),
}

/// Display wrapper so `Error` can stay `PartialEq` while carrying a float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloatDisplay(pub f32);

impl fmt::Display for FloatDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
