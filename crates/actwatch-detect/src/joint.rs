//! The joint cross-site detector's data: a computation's per-site vectors joined into one.
//!
//! The layers of one computation are strongly correlated; a computation whose layers are each
//! plausible but jointly inconsistent (layer 6 of one input under layers 2 and 4 of another)
//! leaves every per-site detector at chance. The joint detectors see the *joint vector*: at one
//! position of one computation, every site's vector, each L2-normalised (so each site weighs the
//! same, as the per-site Gaussian sees it), concatenated in the monitor's site order.
//!
//! Rules:
//! - A trace's position is its `position` when the batch carries positions, else its 0-based
//!   index among the computation's traces at its site (pooled traces: 0 at every site).
//! - A joint vector exists for a (computation, position) once every site has a trace there. A
//!   position some site never reaches has no joint vector (at fit time it is counted as
//!   incomplete and reported; when scoring, the joint slots simply get no evidence from it).
//! - A second trace at the same (computation, site, position) replaces the first if the joint
//!   vector was not complete yet, and starts a new one otherwise.
//! - Traces waiting for their other sites are held in memory, at most
//!   [`JOINT_PENDING_MAX_BYTES`] per fit pass, and per scoring stream the limit its
//!   [`crate::OpenComputations`] was given (the same by default) ([`Error::JointPending`]).
//!
//! Joint detectors are fitted from sufficient statistics like the per-site ones, so their memory
//! is that of a per-site detector of the joint width: a Gaussian at width `D` accumulates a
//! `D × D` f64 matrix (10 MiB at 3 × 384, 128 MiB at 4096).
//!
//! **Wide models.** Above [`JOINT_MAX_WIDTH`] in total (4 sites × 4096 = 16,384: its statistics
//! alone would be 2 GiB, its eigendecomposition hours), a site's part of the joint vector is not
//! its whole normalised vector but its top `r` *whitened principal coordinates* under the site's
//! own fitted Gaussian: `(y - mean_s) · B_s`, `y` the vector as the site's Gaussian prepares it
//! (L2-normalised by default), `B_s` its top `r` eigenvectors each divided by the square root of
//! its eigenvalue ([`crate::GaussianDetector::whitened_coordinates`]), `r = min(the site Gaussian's
//! rank, JOINT_MAX_WIDTH / sites)`. With the default rank 256 at wide sites, 4 × 4096 becomes a
//! joint vector of 4 × 256 = 1024 coordinates: a full-covariance joint Gaussian of 8 MiB of
//! statistics. Scoring makes no second product for it: a low-rank site Gaussian's own product
//! already holds those coordinates ([`crate::GaussianDetector::score_with_coordinates`], taken by
//! [`crate::Monitor::score_for_computations`]); a full-rank one (whose scoring multiplies by a
//! triangular factor instead) costs one `d × r` product more.
//! This is low rank plus residual in the sense that matters here: each site's residual (the
//! directions outside its top `r`) is already judged by its own Gaussian, and what the joint
//! detector adds, the correlation *between* sites, lives in the coordinates it keeps, where the
//! variance is. The reduction is a pure function of the sites' fitted Gaussians, so it is rebuilt
//! when a monitor is loaded ([`JointMap::new`]), never stored. A wide monitor without a Gaussian
//! at every site has no reduction: its joint detector is skipped and the fit says why.

use std::collections::BTreeMap;

use actwatch_core::l2_normalize_rows;

use crate::gaussian::GaussianDetector;
use crate::spec::FittedDetector;
use crate::{Error, Result};

/// The name of the joint slots' "site" in slot names (`joint`/`gaussian`) and output columns
/// (`p_joint_gaussian`); a reference site may not be called this when a joint detector is fitted.
pub const JOINT_SITE: &str = "joint";

/// Widest joint vector made of whole site vectors (the sum of the site widths; a Gaussian's
/// statistics at this width are 128 MiB of f64); wider monitors join principal coordinates.
pub const JOINT_MAX_WIDTH: usize = 4096;

/// Bytes of traces held while they wait for the rest of their joint vector, per fit pass, and
/// per scoring stream by default.
pub const JOINT_PENDING_MAX_BYTES: usize = 64 << 20;

/// What fitting the joint detector saw (reported by the fit).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct JointSummary {
    /// The sites concatenated, in order.
    pub sites: Vec<String>,
    pub width: usize,
    pub fit_rows: u64,
    pub calibration_rows: u64,
    /// Reference positions left without a joint vector (some site had no trace there).
    pub incomplete: u64,
    /// Why no joint detector was fitted although the options ask for one.
    pub skipped: Option<String>,
    /// Each site's part of the joint vector: its width, or, above [`JOINT_MAX_WIDTH`] in total,
    /// its number of principal coordinates (empty in monitors saved before wide joints existed).
    #[serde(default)]
    pub site_widths: Vec<usize>,
}

/// How each site's traces become their part of the joint vector (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct JointMap {
    parts: Vec<SitePart>,
    width: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum SitePart {
    /// The L2-normalised vector (joint widths up to [`JOINT_MAX_WIDTH`]).
    Normalized { dim: usize },
    /// The top `r` whitened principal coordinates under the site's Gaussian, its `detector`-th
    /// ([`GaussianDetector::whitened_coordinates`]).
    Principal { r: usize, detector: usize },
}

impl JointMap {
    /// The map for sites of these widths, each with its first fitted Gaussian if it has one (its
    /// index among the site's detectors, and it). `Err` says why there is none (the joint
    /// detector is then skipped).
    pub fn new(
        sites: &[(usize, Option<(usize, &GaussianDetector)>)],
    ) -> std::result::Result<Self, String> {
        let total: usize = sites.iter().map(|(d, _)| d).sum();
        if total <= JOINT_MAX_WIDTH {
            return Ok(Self {
                parts: sites
                    .iter()
                    .map(|&(dim, _)| SitePart::Normalized { dim })
                    .collect(),
                width: total,
            });
        }
        let per_site = JOINT_MAX_WIDTH / sites.len().max(1);
        if per_site == 0 {
            return Err(format!(
                "{} sites: more than {JOINT_MAX_WIDTH}, not even one coordinate each",
                sites.len()
            ));
        }
        let mut parts = Vec::with_capacity(sites.len());
        for (i, &(dim, g)) in sites.iter().enumerate() {
            let Some((detector, g)) = g else {
                return Err(format!(
                    "the joint width {total} is above {JOINT_MAX_WIDTH}, and site {i} (in site \
                     order) has no Gaussian detector whose principal coordinates could stand for it"
                ));
            };
            if g.dim() != dim {
                return Err(format!(
                    "site {i} (in site order) is {dim} wide, but its Gaussian {}",
                    g.dim()
                ));
            }
            let r = g.rank().min(per_site);
            parts.push(SitePart::Principal { r, detector });
        }
        let width = parts.iter().map(SitePart::width).sum();
        Ok(Self { parts, width })
    }

    /// The joint vector's width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Each site's part of the joint vector: its width, or its number of principal coordinates.
    pub fn part_widths(&self) -> Vec<usize> {
        self.parts.iter().map(SitePart::width).collect()
    }

    /// The width of site `site`'s part.
    pub fn part_width(&self, site: usize) -> usize {
        self.parts[site].width()
    }

    /// Whether sites are reduced to principal coordinates.
    pub fn is_reduced(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, SitePart::Principal { .. }))
    }

    /// The parts of the joint vector that `rows` (row-major, of site `site`'s width) give,
    /// row-major; `detectors` are the site's (the ones the map was made from).
    pub fn map_rows(
        &self,
        site: usize,
        rows: &[f32],
        detectors: &[FittedDetector],
    ) -> Result<Vec<f32>> {
        match self.parts[site] {
            SitePart::Normalized { dim } => {
                let mut v = rows.to_vec();
                l2_normalize_rows(&mut v, dim);
                Ok(v)
            }
            SitePart::Principal { r, detector } => {
                Ok(site_gaussian(detectors, detector)?.whitened_coordinates(rows, r)?)
            }
        }
    }

    /// When site `site`'s part is principal coordinates: the index of the Gaussian among the
    /// site's detectors and how many, so that scoring can take them from the Gaussian's own
    /// product ([`GaussianDetector::score_with_coordinates`], the same bits as
    /// [`JointMap::map_rows`]).
    pub fn coordinates_of(&self, site: usize) -> Option<(usize, usize)> {
        match self.parts[site] {
            SitePart::Normalized { .. } => None,
            SitePart::Principal { r, detector } => Some((detector, r)),
        }
    }
}

/// The `detector`-th of a site's detectors, which the joint map says is a Gaussian.
fn site_gaussian(detectors: &[FittedDetector], detector: usize) -> Result<&GaussianDetector> {
    match detectors.get(detector) {
        Some(FittedDetector::Gaussian(g)) => Ok(g),
        _ => Err(Error::InvalidOption(format!(
            "joint detector: the site's detector {detector} is not the Gaussian its joint part \
             was made from"
        ))),
    }
}

impl SitePart {
    fn width(&self) -> usize {
        match self {
            SitePart::Normalized { dim } => *dim,
            SitePart::Principal { r, .. } => *r,
        }
    }
}

/// One computation's traces waiting for their other sites.
#[derive(Debug, Clone, Default)]
pub(crate) struct Joiner {
    /// Per site: traces seen (the position of a trace that carries none).
    seen: Vec<u32>,
    /// Per position: each site's normalised vector, once it arrived.
    pending: BTreeMap<i64, Vec<Option<Box<[f32]>>>>,
}

impl Joiner {
    pub(crate) fn new(sites: usize) -> Self {
        Self {
            seen: vec![0; sites],
            pending: BTreeMap::new(),
        }
    }

    /// Adds `part`, site `site`'s part of a joint vector ([`JointMap::map_rows`] of one trace), at
    /// `position` (None: the next index at that site).
    /// Returns the position and the joint vector if this completed one; `pending_bytes` is the
    /// owner's running total of held bytes, checked against `max_bytes` before anything is held.
    pub(crate) fn add(
        &mut self,
        site: usize,
        position: Option<i32>,
        part: &[f32],
        pending_bytes: &mut usize,
        max_bytes: usize,
    ) -> Result<Option<(i64, Vec<f32>)>> {
        let n_sites = self.seen.len();
        let seen = &mut self.seen[site];
        let key = position.map_or(i64::from(*seen), i64::from);
        *seen = seen.saturating_add(1);
        let bytes = std::mem::size_of_val(part);
        let parts = self
            .pending
            .entry(key)
            .or_insert_with(|| vec![None; n_sites]);
        let completes = parts
            .iter()
            .enumerate()
            .all(|(i, p)| i == site || p.is_some());
        let v = part.to_vec();
        if !completes {
            // held until the other sites arrive (a replaced trace holds no more)
            if parts[site].is_none() {
                if *pending_bytes + bytes > max_bytes {
                    if parts.iter().all(Option::is_none) {
                        self.pending.remove(&key);
                    }
                    return Err(Error::JointPending { max: max_bytes });
                }
                *pending_bytes += bytes;
            }
            parts[site] = Some(v.into_boxed_slice());
            return Ok(None);
        }
        let mut parts = self.pending.remove(&key).expect("present");
        let mut joint = Vec::with_capacity(part.len() * n_sites);
        for (i, p) in parts.iter_mut().enumerate() {
            if i == site {
                if let Some(old) = p.take() {
                    // a repeat of the completing site's trace replaces the held one
                    *pending_bytes -= std::mem::size_of_val(&*old);
                }
                joint.extend_from_slice(&v);
            } else {
                let p = p.take().expect("complete");
                *pending_bytes -= std::mem::size_of_val(&*p);
                joint.extend_from_slice(&p);
            }
        }
        Ok(Some((key, joint)))
    }

    /// Positions still waiting for a site.
    pub(crate) fn incomplete(&self) -> usize {
        self.pending.len()
    }

    /// Bytes held by waiting traces.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.pending
            .values()
            .flatten()
            .flatten()
            .map(|p| std::mem::size_of_val(&**p))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_by_position_or_arrival_and_normalises_each_site() {
        let mut bytes = 0;
        let mut j = Joiner::new(2);
        // widths 2 and 3: each site's part is its L2-normalised vector
        let map = JointMap::new(&[(2, None), (3, None)]).unwrap();
        assert_eq!((map.width(), map.is_reduced()), (5, false));
        let n0 = |row: &[f32]| map.map_rows(0, row, &[]).unwrap();
        let n1 = |row: &[f32]| map.map_rows(1, row, &[]).unwrap();
        // pooled: position = index at the site
        assert_eq!(
            j.add(
                0,
                None,
                &n0(&[3.0, 4.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES
            )
            .unwrap(),
            None
        );
        assert_eq!(bytes, 8);
        let (key, v) = j
            .add(
                1,
                None,
                &n1(&[0.0, 2.0, 0.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES,
            )
            .unwrap()
            .unwrap();
        assert_eq!(key, 0);
        assert_eq!(v, vec![0.6, 0.8, 0.0, 1.0, 0.0]);
        assert_eq!(bytes, 0);
        // explicit positions, out of order across sites
        assert!(j
            .add(
                1,
                Some(7),
                &n1(&[1.0, 0.0, 0.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES
            )
            .unwrap()
            .is_none());
        assert!(j
            .add(
                1,
                Some(8),
                &n1(&[0.0, 0.0, 5.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES
            )
            .unwrap()
            .is_none());
        let (key, v) = j
            .add(
                0,
                Some(8),
                &n0(&[0.0, 1.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES,
            )
            .unwrap()
            .unwrap();
        assert_eq!((key, v), (8, vec![0.0, 1.0, 0.0, 0.0, 1.0]));
        assert_eq!(j.incomplete(), 1);
        assert_eq!(bytes, j.pending_bytes());
        // a repeated trace replaces the waiting one without holding more
        assert!(j
            .add(
                1,
                Some(7),
                &n1(&[0.0, 1.0, 0.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES
            )
            .unwrap()
            .is_none());
        assert_eq!(bytes, 12);
        let (_, v) = j
            .add(
                0,
                Some(7),
                &n0(&[1.0, 0.0]),
                &mut bytes,
                JOINT_PENDING_MAX_BYTES,
            )
            .unwrap()
            .unwrap();
        assert_eq!(v, vec![1.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!((bytes, j.incomplete()), (0, 0));
    }

    #[test]
    fn holding_more_than_the_limit_is_refused() {
        let mut j = Joiner::new(2);
        let row = vec![1.0f32; 1024];
        let mut bytes = JOINT_PENDING_MAX_BYTES - 4096;
        assert!(j
            .add(0, Some(0), &row, &mut bytes, JOINT_PENDING_MAX_BYTES)
            .unwrap()
            .is_none());
        let err = j
            .add(0, Some(1), &row, &mut bytes, JOINT_PENDING_MAX_BYTES)
            .unwrap_err();
        assert!(matches!(err, Error::JointPending { .. }), "{err}");
        assert_eq!(j.incomplete(), 1);
        // completing a waiting position needs no room
        assert!(j
            .add(1, Some(0), &row, &mut bytes, JOINT_PENDING_MAX_BYTES)
            .unwrap()
            .is_some());
    }
}
