//! [`SiteBatch`]: the one shape in which traces of one site travel between crates.

use std::sync::Arc;

use crate::{Error, Provenance, Result, Vectors};

/// A batch of traces of one site: row `i` is the vector `vectors.row(i)` of computation
/// `trace_ids[i]`, at token position `positions[i]` when the batch carries positions.
///
/// Every door builds one (the gRPC decoder, the Parquet reader's per-site groups, torch capture),
/// and every consumer takes one (scoring, segment and trace writers), so the invariants below are
/// checked once, in [`SiteBatch::new`], and hold for everybody after:
/// - the site name is not empty;
/// - there is exactly one trace id per row, and no id is empty;
/// - positions are absent or one per row.
///
/// Finiteness is the [`Vectors`]' business ([`Vectors::new_finite`] / [`crate::check_rows`]).
///
/// A batch may also say what produced it ([`SiteBatch::with_provenance`]); shared, since the
/// batches of one file or one stream usually say the same.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteBatch {
    site: String,
    trace_ids: Vec<String>,
    positions: Option<Vec<i32>>,
    vectors: Vectors,
    provenance: Option<Arc<Provenance>>,
}

impl SiteBatch {
    /// Checks the invariants above; the error says which one failed.
    pub fn new(
        site: impl Into<String>,
        trace_ids: Vec<String>,
        positions: Option<Vec<i32>>,
        vectors: Vectors,
    ) -> Result<Self> {
        let site = site.into();
        if site.is_empty() {
            return Err(Error::Malformed("the site name is empty".into()));
        }
        let rows = vectors.rows();
        if trace_ids.len() != rows {
            return Err(Error::Malformed(format!(
                "{} trace ids for {rows} rows: one id per row is required",
                trace_ids.len()
            )));
        }
        if let Some(i) = trace_ids.iter().position(String::is_empty) {
            return Err(Error::Malformed(format!("trace id of row {i} is empty")));
        }
        if let Some(p) = &positions {
            if p.len() != rows {
                return Err(Error::Malformed(format!(
                    "{} positions for {rows} rows: give none or one per row",
                    p.len()
                )));
            }
        }
        Ok(Self {
            site,
            trace_ids,
            positions,
            vectors,
            provenance: None,
        })
    }

    /// The batch, declaring what produced it (an empty provenance declares nothing).
    pub fn with_provenance(mut self, provenance: Option<Arc<Provenance>>) -> Self {
        self.provenance = provenance.filter(|p| !p.is_empty());
        self
    }

    /// What produced the batch, when declared.
    pub fn provenance(&self) -> Option<&Arc<Provenance>> {
        self.provenance.as_ref()
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// The computation of every row.
    pub fn trace_ids(&self) -> &[String] {
        &self.trace_ids
    }

    /// The token position of every row, when the batch carries positions.
    pub fn positions(&self) -> Option<&[i32]> {
        self.positions.as_deref()
    }

    pub fn vectors(&self) -> &Vectors {
        &self.vectors
    }

    pub fn rows(&self) -> usize {
        self.trace_ids.len()
    }

    /// The vector width.
    pub fn dim(&self) -> usize {
        self.vectors.dim()
    }

    /// The parts, for a consumer that takes ownership of them (e.g. a column writer).
    pub fn into_parts(self) -> (String, Vec<String>, Option<Vec<i32>>, Vectors) {
        (self.site, self.trace_ids, self.positions, self.vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(rows: usize) -> Vectors {
        Vectors::new(2, vec![0.5; rows * 2]).unwrap()
    }

    #[test]
    fn invariants_are_checked_once() {
        let ids = |n: usize| (0..n).map(|i| format!("c{i}")).collect::<Vec<_>>();
        let b = SiteBatch::new("layer.2", ids(3), Some(vec![0, 1, 2]), vectors(3)).unwrap();
        assert_eq!((b.site(), b.rows(), b.dim()), ("layer.2", 3, 2));
        assert_eq!(b.positions(), Some(&[0, 1, 2][..]));
        let err = |r: Result<SiteBatch>| r.unwrap_err().to_string();
        assert!(err(SiteBatch::new("", ids(1), None, vectors(1))).contains("site name"));
        assert!(err(SiteBatch::new("s", ids(2), None, vectors(3))).contains("2 trace ids for 3"));
        assert!(err(SiteBatch::new("s", ids(2), Some(vec![1]), vectors(2))).contains("positions"));
        let mut blank = ids(2);
        blank[1].clear();
        assert!(err(SiteBatch::new("s", blank, None, vectors(2))).contains("row 1 is empty"));
    }
}
