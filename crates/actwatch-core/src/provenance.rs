//! [`Provenance`]: what produced a site's vectors (model, revision, capture path, pooling, dtype).
//!
//! Activations of the same layer read through two capture paths can differ (a forward hook on a
//! module's output vs a traced model's hidden states, pre- or post-LayerNorm, mean- vs
//! last-token pooling, float32 vs bfloat16 compute), and a monitor fitted on one and applied to
//! the other is wrong in a way no test of its detectors shows: its calibration no longer holds.
//! So a batch may declare where its vectors came from, a monitor records what its reference
//! vectors came from, and the two are compared field by field ([`Provenance::conflict`]).
//!
//! Every field is optional: an undeclared field matches anything (old clients, hand-made files),
//! so the check is only as strong as what producers declare; actwatch's own producers (the
//! `capture` command, the Python client's hooks) declare every field they know.

use std::fmt;

use crate::{Error, Result};

/// Longest value of one provenance field, in bytes.
pub const MAX_PROVENANCE_VALUE_BYTES: usize = 256;

/// What produced a batch of vectors. `None`: not declared.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    /// The model, e.g. "sentence-transformers/all-MiniLM-L6-v2".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The weights' revision: a commit hash, a version, a checksum of the weights file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The capture path: library or hook and what it reads, e.g. "actwatch capture" or
    /// "actwatch_client.hooks:output".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    /// How token vectors were pooled: "none" (one vector per token), "mean", "last", ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<String>,
    /// The dtype the model computed in (not the dtype the vectors travelled in), e.g. "float32".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

/// A field declared on both sides with different values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenanceConflict {
    /// "model", "revision", "capture", "pooling" or "dtype".
    pub field: &'static str,
    /// The value recorded first (the monitor's, the reference's).
    pub recorded: String,
    /// The value of the batch that disagrees.
    pub declared: String,
}

impl fmt::Display for ProvenanceConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?}, not {:?}",
            self.field, self.declared, self.recorded
        )
    }
}

impl Provenance {
    /// The field names, in order.
    pub const FIELDS: [&'static str; 5] = ["model", "revision", "capture", "pooling", "dtype"];

    /// A provenance from `(field, value)` pairs; empty values mean undeclared. Refuses unknown
    /// fields, values over [`MAX_PROVENANCE_VALUE_BYTES`] and control characters.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        let mut p = Self::default();
        for (field, value) in pairs {
            let slot = p.field_mut(field).ok_or_else(|| {
                Error::Provenance(format!(
                    "unknown field {field:?} (known: {})",
                    Self::FIELDS.join(", ")
                ))
            })?;
            *slot = (!value.is_empty()).then(|| value.to_string());
        }
        p.validate()?;
        Ok(p)
    }

    /// Checks every declared value: at most [`MAX_PROVENANCE_VALUE_BYTES`] bytes, no control
    /// characters.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in self.declared() {
            if value.len() > MAX_PROVENANCE_VALUE_BYTES {
                return Err(Error::Provenance(format!(
                    "{field} is {} bytes, over the limit of {MAX_PROVENANCE_VALUE_BYTES}",
                    value.len()
                )));
            }
            if value.chars().any(char::is_control) {
                return Err(Error::Provenance(format!(
                    "{field} contains a control character"
                )));
            }
        }
        Ok(())
    }

    fn field_mut(&mut self, field: &str) -> Option<&mut Option<String>> {
        Some(match field {
            "model" => &mut self.model,
            "revision" => &mut self.revision,
            "capture" => &mut self.capture,
            "pooling" => &mut self.pooling,
            "dtype" => &mut self.dtype,
            _ => return None,
        })
    }

    fn fields(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("model", &self.model),
            ("revision", &self.revision),
            ("capture", &self.capture),
            ("pooling", &self.pooling),
            ("dtype", &self.dtype),
        ]
    }

    /// The declared fields, in order.
    pub fn declared(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.fields()
            .into_iter()
            .filter_map(|(f, v)| v.as_deref().map(|v| (f, v)))
    }

    /// Whether nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.declared().next().is_none()
    }

    /// The first field that `self` (recorded) and `other` (declared) both declare with different
    /// values.
    pub fn conflict(&self, other: &Provenance) -> Option<ProvenanceConflict> {
        self.fields()
            .into_iter()
            .zip(other.fields())
            .find_map(|((field, a), (_, b))| match (a, b) {
                (Some(a), Some(b)) if a != b => Some(ProvenanceConflict {
                    field,
                    recorded: a.clone(),
                    declared: b.clone(),
                }),
                _ => None,
            })
    }

    /// Adds what `other` declares and `self` does not; refuses (and changes nothing) when they
    /// conflict.
    pub fn merge(&mut self, other: &Provenance) -> std::result::Result<(), ProvenanceConflict> {
        if let Some(c) = self.conflict(other) {
            return Err(c);
        }
        for (field, value) in other.declared() {
            let slot = self.field_mut(field).expect("a known field");
            if slot.is_none() {
                *slot = Some(value.to_string());
            }
        }
        Ok(())
    }
}

impl fmt::Display for Provenance {
    /// `field=value` pairs, comma-separated; "undeclared" when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("undeclared");
        }
        for (i, (field, value)) in self.declared().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{field}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Provenance {
        Provenance::from_pairs(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn undeclared_fields_match_anything_declared_ones_must_agree() {
        let monitor = p(&[("model", "m"), ("pooling", "mean")]);
        assert_eq!(monitor.conflict(&Provenance::default()), None);
        assert_eq!(
            monitor.conflict(&p(&[("model", "m"), ("dtype", "f32")])),
            None
        );
        let c = monitor
            .conflict(&p(&[("model", "m"), ("pooling", "last")]))
            .unwrap();
        assert_eq!((c.field, c.recorded.as_str()), ("pooling", "mean"));
        assert_eq!(c.to_string(), "pooling \"last\", not \"mean\"");
        assert_eq!(monitor.to_string(), "model=m, pooling=mean");
        assert_eq!(Provenance::default().to_string(), "undeclared");
    }

    #[test]
    fn merge_fills_undeclared_fields_and_refuses_conflicts() {
        let mut a = p(&[("model", "m")]);
        a.merge(&p(&[("dtype", "bfloat16")])).unwrap();
        assert_eq!(a, p(&[("model", "m"), ("dtype", "bfloat16")]));
        let before = a.clone();
        assert!(a.merge(&p(&[("revision", "r"), ("model", "x")])).is_err());
        assert_eq!(a, before, "a refused merge changes nothing");
    }

    #[test]
    fn hostile_values_are_refused() {
        let long = "x".repeat(MAX_PROVENANCE_VALUE_BYTES + 1);
        let err = |pairs: &[(&str, &str)]| {
            Provenance::from_pairs(pairs.iter().copied())
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[("model", &long)]).contains("over the limit of 256"));
        assert!(err(&[("capture", "a\nb")]).contains("control character"));
        assert!(err(&[("weights", "w")]).contains("invalid provenance: unknown field"));
        assert!(p(&[("model", "")]).is_empty());
    }
}
