use actwatch_core::ProvenanceConflict;

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
    /// Traces whose declared provenance differs from what the site's reference traces declared
    /// (`scoring`: a scored batch against the fitted monitor; else a reference batch against
    /// the site's earlier reference batches).
    #[error("{}", provenance_message(site, conflict, *scoring))]
    Provenance {
        site: String,
        conflict: ProvenanceConflict,
        scoring: bool,
    },
    /// A numerical routine failed (e.g. an eigendecomposition did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
}

fn provenance_message(site: &str, c: &ProvenanceConflict, scoring: bool) -> String {
    let (field, declared, recorded) = (c.field, &c.declared, &c.recorded);
    if scoring {
        format!(
            "site {site:?}: these traces declare {field} {declared:?}, but the monitor's reference \
             traces declared {field} {recorded:?}: activations read another way can differ, so \
             the monitor's calibration does not hold for them. Refit on traces from this path, or \
             score with the provenance policy \"warn\" to score anyway"
        )
    } else {
        format!(
            "site {site:?}: these reference traces declare {field} {declared:?}, but earlier \
             reference traces of the site declared {field} {recorded:?}: one site's reference \
             traces must come from one capture path (use another site name or another monitor)"
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
