//! Provenance in Parquet files: the key-value metadata entry [`PROVENANCE_KEY`] says what produced
//! the traces of each site ([`actwatch_core::Provenance`]).
//!
//! Its value is a JSON object from site name to an object of provenance fields; the site `"*"`
//! applies to every site not named. For example:
//!
//! ```json
//! {"*": {"model": "sentence-transformers/all-MiniLM-L6-v2", "capture": "my-hooks", "pooling": "mean"},
//!  "6": {"dtype": "float32"}}
//! ```
//!
//! A named site's entry replaces `"*"` for that site (it is not merged with it). [`TraceWriter`]
//! writes the entry from the batches it was given; [`TraceReader`] reads it and hands each site's
//! provenance to the batches of that site. Files without the entry declare nothing.
//!
//! [`TraceWriter`]: crate::writer::TraceWriter
//! [`TraceReader`]: crate::reader::TraceReader

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use actwatch_core::Provenance;

use crate::{Error, Result};

/// The Parquet key-value metadata key of a file's provenance.
pub const PROVENANCE_KEY: &str = "actwatch.provenance";
/// The site entry that applies to every site not named.
pub const ALL_SITES: &str = "*";
/// Most site entries one file's provenance may hold.
pub const MAX_PROVENANCE_SITES: usize = 4096;

/// The provenance of one file's traces, per site.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileProvenance {
    sites: BTreeMap<String, Arc<Provenance>>,
    all: Option<Arc<Provenance>>,
}

impl FileProvenance {
    /// What produced the traces of `site`, when the file says.
    pub fn site(&self, site: &str) -> Option<&Arc<Provenance>> {
        self.sites.get(site).or(self.all.as_ref())
    }

    /// Parses the metadata value of file `path`; a malformed or oversized value is an error
    /// naming the file.
    pub fn parse(path: &Path, json: &str) -> Result<Self> {
        let bad = |message: String| Error::Metadata {
            path: path.to_path_buf(),
            key: PROVENANCE_KEY,
            message,
        };
        let raw: BTreeMap<String, BTreeMap<String, String>> =
            serde_json::from_str(json).map_err(|e| {
                bad(format!(
                    "not a JSON object of site -> {{field: string}}: {e}"
                ))
            })?;
        if raw.len() > MAX_PROVENANCE_SITES {
            return Err(bad(format!(
                "{} site entries, over the limit of {MAX_PROVENANCE_SITES}",
                raw.len()
            )));
        }
        let mut out = Self::default();
        for (site, fields) in raw {
            let p = Provenance::from_pairs(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| bad(format!("site {site:?}: {e}")))?;
            let p = (!p.is_empty()).then(|| Arc::new(p));
            if site == ALL_SITES {
                out.all = p;
            } else if let Some(p) = p {
                out.sites.insert(site, p);
            }
        }
        Ok(out)
    }

    /// The metadata value for these per-site provenances (undeclared sites left out).
    pub fn encode(sites: &BTreeMap<String, Provenance>) -> Result<String> {
        let declared: BTreeMap<&String, &Provenance> =
            sites.iter().filter(|(_, p)| !p.is_empty()).collect();
        Ok(serde_json::to_string(&declared)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov(pairs: &[(&str, &str)]) -> Provenance {
        Provenance::from_pairs(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn named_sites_replace_the_default_entry() {
        let json = r#"{"*": {"model": "m", "pooling": "mean"}, "6": {"dtype": "float32"}}"#;
        let f = FileProvenance::parse(Path::new("x.parquet"), json).unwrap();
        assert_eq!(
            **f.site("2").unwrap(),
            prov(&[("model", "m"), ("pooling", "mean")])
        );
        assert_eq!(**f.site("6").unwrap(), prov(&[("dtype", "float32")]));
        let none = FileProvenance::parse(Path::new("x.parquet"), r#"{"a": {}}"#).unwrap();
        assert_eq!(none.site("a"), None);
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let mut sites = BTreeMap::new();
        sites.insert("a".to_string(), prov(&[("model", "m"), ("capture", "c")]));
        sites.insert("b".to_string(), Provenance::default());
        let json = FileProvenance::encode(&sites).unwrap();
        assert_eq!(json, r#"{"a":{"model":"m","capture":"c"}}"#);
        let f = FileProvenance::parse(Path::new("x"), &json).unwrap();
        assert_eq!(**f.site("a").unwrap(), sites["a"]);
        assert_eq!(f.site("b"), None);
    }

    #[test]
    fn malformed_values_name_the_file_and_the_problem() {
        let err = |json: &str| {
            FileProvenance::parse(Path::new("in.parquet"), json)
                .unwrap_err()
                .to_string()
        };
        assert!(err("[1, 2]").contains("in.parquet"));
        assert!(err(r#"{"a": {"model": 3}}"#).contains("not a JSON object"));
        assert!(err(r#"{"a": {"weights": "w"}}"#).contains("unknown field \"weights\""));
        let long = format!(r#"{{"a": {{"model": "{}"}}}}"#, "m".repeat(300));
        assert!(err(&long).contains("over the limit of 256"));
    }
}
