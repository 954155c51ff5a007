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
    /// A batch of a site the monitor was not fitted on.
    #[error("the fitted monitor has no site {site:?} (its sites: {known}); fit it on reference traces of that site")]
    UnknownSite { site: String, known: String },
    /// A batch whose width differs from its site's.
    #[error("site {site:?} has width {expected}, but the batch has width {got}")]
    SiteWidth {
        site: String,
        expected: usize,
        got: usize,
    },
    /// A batch would open more computations than a scoring stream may hold.
    #[error("{open} computations are open and {new} new in this batch, over the limit of {max}; complete some first")]
    TooManyOpen { max: usize, open: usize, new: usize },
    /// Completing a computation that is not open in this scoring stream.
    #[error(
        "computation {0:?} has no open traces in this stream (never sent, or completed already)"
    )]
    NotOpen(String),
    /// Traces waiting for the other sites of their joint vector would hold more than the limit.
    #[error("traces waiting for the other sites of their joint vector would hold more than {max} bytes; send (or sort) a computation's sites together, or fit without a joint detector")]
    JointPending { max: usize },
    /// A numerical routine failed (e.g. an eigendecomposition did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
