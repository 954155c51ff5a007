//! Every conversion between the wire (`actwatch_proto::v1`) and the service's own types: monitor
//! specs to the core's [`MonitorOptions`], and the stored monitors, fits and logged scores to the
//! messages that report them. Storage knows nothing of the wire; this module is where the two
//! meet (handlers only wrap its messages in response envelopes). Logged scores and served fits are
//! destructured here, so a field added to them breaks the build where it must be reported.

use actwatch_core::{ProvenanceConflict, SiteBatch};
use actwatch_detect::aggregate::DEFAULT_AGGREGATION;
use actwatch_detect::fusion::DEFAULT_FUSION;
use actwatch_detect::joint::JointSummary;
use actwatch_detect::monitor::{
    MonitorOptions, ProvenancePolicy, DEFAULT_CALIBRATION_FRACTION, DEFAULT_FPR,
    DEFAULT_LENGTH_STRATA,
};
use actwatch_detect::probe::ProbeSpec;
use actwatch_detect::spec::{DEFAULT_DETECTORS, DEFAULT_JOINT};
use actwatch_detect::{Aggregation, DetectorSpec, Fusion, Monitor, SiteScores};
use actwatch_proto::v1;
use serde::{Deserialize, Serialize};

use crate::storage::{
    FittedMonitor, LoggedProbe, LoggedScore, LoggedSlot, MonitorEntry, ReferenceCheckRecord,
};
use crate::{Error, Result};

/// Longest monitor name.
pub const MAX_NAME_LEN: usize = 64;

/// A monitor spec with every default filled in, as stored in `spec.json` and returned by
/// GetMonitor: what the client asked, in the client's words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSpec {
    pub detectors: Vec<String>,
    /// Specs stored before aggregation existed read back as "max", what they did.
    #[serde(default = "stored_aggregation")]
    pub aggregation: String,
    /// Joint detectors, or "none"; specs stored before they existed read back as "none".
    #[serde(default = "no_joint")]
    pub joint: String,
    /// Length strata; specs stored before they existed read back as 1, what they did.
    #[serde(default = "one")]
    pub length_strata: usize,
    /// "refuse" or "warn" ([`ProvenancePolicy`]); specs stored before it existed read back as
    /// "refuse" (they recorded no provenance, so nothing conflicts with them).
    #[serde(default = "default_provenance_policy")]
    pub provenance_policy: String,
    pub fusion: String,
    pub fpr: f64,
    pub calibration_fraction: f64,
    pub seed: u64,
    /// Concept probes, as the client wrote them; specs stored before probes existed have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<String>,
}

/// The aggregation of a spec stored before aggregation existed: `max`, what it did.
fn stored_aggregation() -> String {
    Aggregation::default().to_string()
}

/// The aggregation of a new spec that names none.
fn default_aggregation() -> String {
    DEFAULT_AGGREGATION.to_string()
}

/// The `joint` of a spec without joint detectors.
const NO_JOINT: &str = "none";

fn no_joint() -> String {
    NO_JOINT.to_string()
}

fn one() -> usize {
    1
}

fn default_provenance_policy() -> String {
    ProvenancePolicy::default().name().to_string()
}

impl StoredSpec {
    /// Fills in the defaults of a proto spec (see the field docs of `MonitorSpec`) and validates it.
    pub fn from_proto(spec: Option<v1::MonitorSpec>) -> Result<Self> {
        let v1::MonitorSpec {
            detectors,
            fusion,
            fpr,
            calibration_fraction,
            seed,
            aggregation,
            joint,
            length_strata,
            provenance_policy,
            probes,
        } = spec.unwrap_or_default();
        let spec = StoredSpec {
            detectors: if detectors.is_empty() {
                DEFAULT_DETECTORS.split(',').map(str::to_string).collect()
            } else {
                detectors
            },
            aggregation: if aggregation.is_empty() {
                default_aggregation()
            } else {
                aggregation
            },
            joint: if joint.is_empty() {
                DEFAULT_JOINT.to_string()
            } else {
                joint
            },
            length_strata: if length_strata == 0 {
                DEFAULT_LENGTH_STRATA
            } else {
                length_strata as usize
            },
            fusion: if fusion.is_empty() {
                DEFAULT_FUSION.name().to_string()
            } else {
                fusion
            },
            provenance_policy: if provenance_policy.is_empty() {
                default_provenance_policy()
            } else {
                provenance_policy
            },
            fpr: if fpr == 0.0 { DEFAULT_FPR } else { fpr },
            calibration_fraction: if calibration_fraction == 0.0 {
                DEFAULT_CALIBRATION_FRACTION
            } else {
                calibration_fraction
            },
            seed,
            probes,
        };
        options_from_spec(&spec)?;
        spec.provenance_policy()?;
        Ok(spec)
    }

    /// What scoring does with conflicting provenance.
    pub fn provenance_policy(&self) -> Result<ProvenancePolicy> {
        self.provenance_policy
            .parse()
            .map_err(|e: actwatch_detect::Error| Error::BadSpec(e.to_string()))
    }

    pub fn to_proto(&self) -> v1::MonitorSpec {
        v1::MonitorSpec {
            detectors: self.detectors.clone(),
            aggregation: self.aggregation.clone(),
            joint: self.joint.clone(),
            length_strata: self.length_strata as u32,
            provenance_policy: self.provenance_policy.clone(),
            fusion: self.fusion.clone(),
            fpr: self.fpr,
            calibration_fraction: self.calibration_fraction,
            seed: self.seed,
            probes: self.probes.clone(),
        }
    }
}

/// The core options a spec stands for.
pub fn options_from_spec(spec: &StoredSpec) -> Result<MonitorOptions> {
    let detectors = spec
        .detectors
        .iter()
        .map(|d| DetectorSpec::parse(d).map_err(|e| Error::BadSpec(format!("detector {d:?}: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let fusion = Fusion::parse(&spec.fusion).map_err(|e| Error::BadSpec(e.to_string()))?;
    let aggregation =
        Aggregation::parse(&spec.aggregation).map_err(|e| Error::BadSpec(e.to_string()))?;
    let joint = if spec.joint.trim().eq_ignore_ascii_case(NO_JOINT) {
        Vec::new()
    } else {
        DetectorSpec::parse_list(&spec.joint)
            .map_err(|e| Error::BadSpec(format!("joint {:?}: {e}", spec.joint)))?
    };
    let options = MonitorOptions {
        detectors,
        joint,
        aggregation,
        fusion,
        fpr: spec.fpr,
        calibration_fraction: spec.calibration_fraction,
        seed: spec.seed,
        length_strata: spec.length_strata,
        probes: spec
            .probes
            .iter()
            .map(|p| ProbeSpec::parse(p).map_err(|e| Error::BadSpec(e.to_string())))
            .collect::<Result<_>>()?,
    };
    options
        .validate()
        .map_err(|e| Error::BadSpec(e.to_string()))?;
    Ok(options)
}

/// Checks a monitor name: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot (dot names are the
/// data directory's own temporary folders).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// What GetMonitor and ListMonitors say of a monitor.
pub fn monitor_info(entry: &MonitorEntry) -> v1::MonitorInfo {
    let st = entry.state();
    let fitted = entry.fitted();
    v1::MonitorInfo {
        name: entry.name.clone(),
        spec: Some(entry.spec.to_proto()),
        sites: st
            .sites
            .iter()
            .map(|s| v1::SiteInfo {
                name: s.name.clone(),
                width: s.width as u64,
                reference_rows: s.reference_rows,
                provenance: Some(actwatch_proto::provenance_to_proto(&s.provenance)),
            })
            .collect(),
        reference_rows: st.reference_rows(),
        example_rows: st.example_rows(),
        fitted: fitted.is_some(),
        fit_version: fitted.as_ref().map_or(0, |f| f.fit_version),
        report: fitted.as_deref().map(fit_report),
        damaged: String::new(),
        ingests: entry
            .ingests()
            .iter()
            .map(|i| v1::IngestInfo {
                id: i.id,
                rows: i.rows,
                example_rows: i.example_rows,
                committed_unix_ms: i.committed_unix_ms.unwrap_or(0),
                principal: i.principal.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// What GetMonitor and ListMonitors say of a monitor that could not be loaded at start.
pub fn damaged_info(name: &str, reason: &str) -> v1::MonitorInfo {
    v1::MonitorInfo {
        name: name.to_string(),
        damaged: reason.to_string(),
        ..Default::default()
    }
}

/// The report of a served fit (the last message of Fit, and part of GetMonitor).
pub fn fit_report(fitted: &FittedMonitor) -> v1::FitReport {
    let FittedMonitor {
        monitor,
        fit_version,
        reference_rows,
        run,
        details,
        provenance_logged: _,
    } = fitted;
    let s = monitor.summary();
    v1::FitReport {
        fit_version: *fit_version,
        reference_rows: *reference_rows,
        calibration_computations: s.calibration_computations,
        calibration_fpr: s.calibration_fpr,
        fit_seconds: s.fit_seconds,
        calibration_seconds: s.calibration_seconds,
        knn_recall: s
            .knn_recall
            .iter()
            .map(|r| v1::KnnRecall {
                site: r.site.clone(),
                detector: monitor
                    .options()
                    .detectors
                    .get(r.detector)
                    .map_or("?", |d| d.name())
                    .to_string(),
                queries: r.queries as u64,
                k: r.k as u32,
                recall: r.recall,
            })
            .collect(),
        incremental: run.incremental,
        rows_folded: run.rows_folded,
        joint: s.joint.as_ref().map(joint_fit),
        length_strata: s
            .length_strata
            .iter()
            .map(|l| v1::LengthStratum {
                max_length: l.max_length,
                computations: l.computations,
                threshold: l.threshold,
            })
            .collect(),
        probes: monitor
            .probes()
            .iter()
            .map(|p| probe_fit(&p.summary))
            .collect(),
        ingests: details.ingests.clone(),
        reference_check: details.reference_check.as_ref().map(reference_check),
    }
}

fn reference_check(r: &ReferenceCheckRecord) -> v1::ReferenceCheck {
    v1::ReferenceCheck {
        skipped: r.skipped.clone().unwrap_or_default(),
        alpha: r.alpha,
        seconds: r.seconds,
        ingests: r
            .ingests
            .iter()
            .map(|i| v1::IngestCheck {
                first_ingest: i.first_ingest,
                last_ingest: i.last_ingest,
                principals: i.principals.clone(),
                rows: i.rows,
                computations: i.computations,
                site: i.site.clone().unwrap_or_default(),
                flagged_share: i.flagged_share,
                p_value: i.p_value,
                suspect: i.suspect,
            })
            .collect(),
    }
}

fn probe_fit(s: &actwatch_detect::monitor::ProbeSummary) -> v1::ProbeFit {
    v1::ProbeFit {
        name: s.name.clone(),
        kind: s.kind.clone(),
        sites: s
            .sites
            .iter()
            .map(|site| v1::ProbeSiteFit {
                site: site.site.clone(),
                positive: site.fit.positive,
                negative: site.fit.negative,
                reference: site.fit.reference,
                c: site.c,
            })
            .collect(),
        calibration_reference: s.calibration_reference,
        calibration_negatives: s.calibration_negatives,
        calibration_fpr: s.calibration_fpr,
        negatives_fpr: s.negatives_fpr,
        heldout_positives: s.heldout_positives,
        recall: s.recall,
        deferred_benign: s.deferred_benign,
        deferred_positives: s.deferred_positives,
    }
}

fn joint_fit(j: &JointSummary) -> v1::JointFit {
    let JointSummary {
        sites,
        width,
        fit_rows,
        calibration_rows,
        incomplete,
        skipped,
        site_widths,
    } = j;
    v1::JointFit {
        sites: sites.clone(),
        width: *width as u64,
        fit_rows: *fit_rows,
        calibration_rows: *calibration_rows,
        incomplete: *incomplete,
        skipped: skipped.clone().unwrap_or_default(),
        site_widths: site_widths.iter().map(|&w| w as u64).collect(),
    }
}

/// A logged computation result as the wire reports it.
pub fn computation_score(logged: &LoggedScore, monitor: &str) -> v1::ComputationScore {
    let LoggedScore {
        trace_id,
        score,
        p_value,
        flagged,
        traces,
        slots,
        scored_at_unix_ms,
        fit_version,
        partial,
        flagged_at,
        probes,
    } = logged;
    v1::ComputationScore {
        monitor: monitor.to_string(),
        trace_id: trace_id.clone(),
        score: *score,
        p_value: *p_value,
        flagged: *flagged,
        traces: *traces,
        slots: slots
            .iter()
            .map(
                |LoggedSlot {
                     site,
                     detector,
                     p_value,
                 }| v1::SlotPValue {
                    site: site.clone(),
                    detector: detector.clone(),
                    p_value: *p_value,
                },
            )
            .collect(),
        scored_at_unix_ms: *scored_at_unix_ms,
        fit_version: *fit_version,
        partial: *partial,
        flagged_at: *flagged_at,
        probes: probes
            .iter()
            .map(|p: &LoggedProbe| v1::ProbeScore {
                name: p.name.clone(),
                score: p.score,
                p_value: p.p_value,
                flagged: p.flagged,
                verdict: if p.flagged {
                    "flag"
                } else if p.deferred {
                    "defer"
                } else {
                    "pass"
                }
                .into(),
                flagged_at: p.flagged_at,
            })
            .collect(),
    }
}

/// The questions that flagged a computation on the wire: "anomaly" and its flagging probes.
pub fn raised_by(c: &v1::ComputationScore) -> Vec<String> {
    c.flagged
        .then(|| crate::storage::ANOMALY.to_string())
        .into_iter()
        .chain(
            c.probes
                .iter()
                .filter(|p| p.flagged)
                .map(|p| p.name.clone()),
        )
        .collect()
}

/// A batch of `site` scored despite a provenance conflict.
pub fn provenance_warning(site: &str, c: &ProvenanceConflict) -> v1::ProvenanceWarning {
    v1::ProvenanceWarning {
        site: site.to_string(),
        field: c.field.to_string(),
        declared: c.declared.clone(),
        recorded: c.recorded.clone(),
    }
}

/// Per-trace results of one scored batch as the wire reports them.
pub fn trace_scores(
    monitor: &Monitor,
    batch: &SiteBatch,
    scores: &SiteScores,
) -> Vec<v1::TraceScore> {
    let detectors: Vec<&'static str> = monitor.sites()[scores.site]
        .detectors
        .iter()
        .map(|d| d.name())
        .collect();
    let fpr = monitor.options().fpr;
    batch
        .trace_ids()
        .iter()
        .enumerate()
        .map(|(r, id)| v1::TraceScore {
            trace_id: id.clone(),
            site: batch.site().to_string(),
            position: batch.positions().map(|p| p[r]),
            score: scores.trace_score[r],
            p_value: scores.trace_p[r],
            flagged: scores.trace_p[r] <= fpr,
            detectors: detectors
                .iter()
                .enumerate()
                .map(|(j, name)| v1::DetectorScore {
                    detector: (*name).to_string(),
                    raw: scores.raw[j][r],
                    p_value: scores.p[j][r],
                })
                .collect(),
        })
        .collect()
}

/// Checks a site name's characters: `[A-Za-z0-9_.:-]`, not empty (its length is the
/// `max_site_name_bytes` limit's, checked first). Hook names in use fit (`blocks.12.hook_resid_post`,
/// `model.layers.12`, `12`); path separators, spaces and control characters do not.
pub fn check_site_name(site: &str) -> Result<()> {
    let ok = !site.is_empty()
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadSiteName(excerpt(site)))
    }
}

/// A client string as error messages quote it: at most 32 characters, escaped, marked when cut.
pub fn excerpt(s: &str) -> String {
    const MAX: usize = 32;
    let mut out: String = s
        .chars()
        .take(MAX)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_bad_specs_are_rejected() {
        let s = StoredSpec::from_proto(None).unwrap();
        assert_eq!(s.detectors, ["gaussian", "knn"]);
        assert_eq!(s.fusion, "minp");
        assert_eq!(s.fpr, DEFAULT_FPR);
        let bad = v1::MonitorSpec {
            detectors: vec!["gaussian:shrinkage=nope".into()],
            ..Default::default()
        };
        assert!(matches!(
            StoredSpec::from_proto(Some(bad)),
            Err(Error::BadSpec(_))
        ));
        // Specs that could never fit are refused at create, not at the first Fit.
        for detectors in [
            vec!["knn:m=100000"],
            vec!["knn:k=5,max_references=3"],
            vec!["gaussian:rank=0"],
            vec!["gaussian", "knn", "gaussian"],
        ] {
            let bad = v1::MonitorSpec {
                detectors: detectors.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            };
            assert!(
                matches!(StoredSpec::from_proto(Some(bad)), Err(Error::BadSpec(_))),
                "{detectors:?}"
            );
        }
        let bad = v1::MonitorSpec {
            fpr: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            StoredSpec::from_proto(Some(bad)),
            Err(Error::BadSpec(_))
        ));
    }

    #[test]
    fn site_names_and_excerpts() {
        for ok in [
            "12",
            "blocks.12.hook_resid_post",
            "model.layers.12",
            "enc:3",
            "a-b_c",
        ] {
            check_site_name(ok).unwrap();
        }
        for bad in ["", "../../etc/passwd", "a b", "a\nb", "h[3]", "é"] {
            assert!(check_site_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(excerpt("a\nb"), "\"a\\nb\"");
        let long = excerpt(&"x".repeat(100_000));
        assert!(long.len() < 40 && long.ends_with("...\""), "{long}");
    }

    #[test]
    fn names() {
        for ok in ["a", "minilm-v1.2_x", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
