//! Monitor artifacts: one directory per fitted monitor, written atomically, verified on load.
//!
//! Layout: `manifest.json` (format version, options, sites and widths, detectors, calibration
//! summary, reference hash, and for every blob its size and SHA-256) plus binary blobs: one per
//! site (its fitted detectors and calibrations), one per site whose kNN detector searches an HNSW
//! graph (the graph, so that loading does not rebuild it), and `calibration.bin` (the
//! computation-level calibration). The directory is built under a temporary name next to the destination, every file
//! fsynced, then renamed into place, so a reader sees the old monitor or the new one, never half
//! of either. Loading checks the format version, every blob's size and checksum, and that blobs
//! agree with the manifest; any mismatch is [`Error::Artifact`] and nothing is served.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use actwatch_core::Provenance;
use actwatch_detect::monitor::{
    FitSummary, Monitor, MonitorOptions, ProbeModel, ProbeSite, ProbeSummary, SiteModel,
};
use actwatch_detect::spec::FittedDetector;
use actwatch_detect::strata::LengthStrata;
use actwatch_detect::Calibration;
use actwatch_detect::KnnIndex;
use sha2::{Digest, Sha256};

use crate::durable::{self, sync_dir, write_synced};
use crate::reader::TraceColumns;
use crate::{Error, Result};

/// Name of the manifest inside a monitor directory.
pub const MANIFEST: &str = "manifest.json";
/// Bumped whenever the blob encoding or the manifest changes incompatibly. Version 2: the
/// calibration blob holds the length strata (`actwatch_detect::strata::LengthStrata`); version 1
/// (one calibration) is still read, as one stratum. Version 3: concept probes (`probes` in the
/// manifest, a blob each); a monitor without probes is still written as version 2, so builds
/// that predate probes keep reading it.
pub const FORMAT_VERSION: u32 = 3;
/// The version of a monitor without probes.
const FORMAT_VERSION_WITHOUT_PROBES: u32 = 2;
/// The oldest format version this build reads.
const OLDEST_FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "actwatch-monitor";
const FUSED_BLOB: &str = "calibration.bin";
/// The joint detectors' blob (see `actwatch_detect::joint`), less its `.bin`.
const JOINT_BLOB: &str = "joint";

/// Where the reference data came from, recorded for provenance.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReferenceSummary {
    /// Column names the monitor was fitted with; scoring uses them unless told otherwise.
    pub columns: TraceColumns,
    pub files: Vec<String>,
    pub rows: u64,
    pub computations: u64,
    /// SHA-256 over (site, trace id, vector bytes) of every row used, in read order.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlobEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SiteEntry {
    pub name: String,
    pub dim: usize,
    pub detectors: Vec<String>,
    pub fit_traces: u64,
    pub calibration_traces: u64,
    pub blob: BlobEntry,
    /// The HNSW graphs of the site's kNN detectors (one `Option<KnnIndex>` per detector, in the
    /// detectors' order), when any searches one. Absent in monitors saved before graphs were kept
    /// (and ignored by the builds that predate it): the graph is then rebuilt at load, as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<BlobEntry>,
    /// What produced the site's reference traces (`SiteModel::provenance`; empty when they
    /// declared nothing, and in monitors saved before provenance was recorded).
    #[serde(default, skip_serializing_if = "Provenance::is_empty")]
    pub provenance: Provenance,
}

/// One concept probe: its summary readable here, its per-site probes and calibrations in its blob.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeEntry {
    pub name: String,
    pub summary: ProbeSummary,
    pub blob: BlobEntry,
}

/// What a probe's blob holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct ProbeBlob {
    sites: Vec<ProbeSite>,
    fused: LengthStrata,
}

/// The manifest, as stored in `manifest.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    pub options: MonitorOptions,
    pub sites: Vec<SiteEntry>,
    /// The joint detectors (absent when none were fitted, and in monitors saved before they
    /// existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joint: Option<SiteEntry>,
    pub calibration: BlobEntry,
    pub summary: FitSummary,
    pub reference: ReferenceSummary,
    /// The concept probes, in the order of `options.probes` (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeEntry>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn blob(dir: &Path, file: String, bytes: &[u8]) -> Result<BlobEntry> {
    write_synced(&dir.join(&file), bytes)?;
    Ok(BlobEntry {
        file,
        bytes: bytes.len() as u64,
        sha256: sha256_hex(bytes),
    })
}

/// Writes `monitor` to the directory `out`, atomically replacing any monitor already there.
pub fn save_monitor(
    monitor: &Monitor,
    reference: &ReferenceSummary,
    out: &Path,
) -> Result<Manifest> {
    save_monitor_with(monitor, reference, out, &[])
}

/// [`save_monitor`], with `extra` files (name, bytes) written into the directory before it is
/// renamed into place, so they are installed in the same atomic step as the monitor: what a
/// caller records about the fit (the server's fit version) can never be older or newer than the
/// monitor beside it. The loader ignores them; a name must be a plain file name other than the
/// manifest's and the blobs'.
pub fn save_monitor_with(
    monitor: &Monitor,
    reference: &ReferenceSummary,
    out: &Path,
    extra: &[(&str, &[u8])],
) -> Result<Manifest> {
    for (name, _) in extra {
        if name.is_empty()
            || name.contains(['/', '\\'])
            || name.starts_with('.')
            || *name == MANIFEST
            || name.ends_with(".bin")
        {
            return Err(Error::Artifact(format!(
                "{name:?} cannot be an extra file of a monitor directory"
            )));
        }
    }
    let parent = durable::parent_dir(out);
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    if out.file_name().is_none() {
        return Err(Error::Artifact(format!(
            "{} is not a directory name",
            out.display()
        )));
    }
    if out.exists() && !out.join(MANIFEST).exists() {
        return Err(Error::Artifact(format!(
            "{} exists and is not a monitor directory; refusing to replace it",
            out.display()
        )));
    }
    let tmp = durable::temporary_path(out)?;
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = (|| {
        let entry = |s: &SiteModel, file: &str| -> Result<SiteEntry> {
            let bytes = bincode::serialize(s)?;
            let indexes: Vec<Option<&KnnIndex>> = s
                .detectors
                .iter()
                .map(|d| match d {
                    FittedDetector::Knn(k) => k.index(),
                    FittedDetector::Gaussian(_) => None,
                })
                .collect();
            let index = if indexes.iter().any(Option::is_some) {
                let bytes = bincode::serialize(&indexes)?;
                Some(blob(&tmp, format!("{file}-index.bin"), &bytes)?)
            } else {
                None
            };
            Ok(SiteEntry {
                name: s.name.clone(),
                dim: s.dim,
                detectors: s.detectors.iter().map(|d| d.name().to_string()).collect(),
                fit_traces: s.fit_traces,
                calibration_traces: s.calibration_traces,
                blob: blob(&tmp, format!("{file}.bin"), &bytes)?,
                index,
                provenance: s.provenance.clone(),
            })
        };
        let sites = monitor
            .sites()
            .iter()
            .enumerate()
            .map(|(i, s)| entry(s, &format!("site-{i}")))
            .collect::<Result<Vec<_>>>()?;
        let joint = monitor.joint().map(|j| entry(j, JOINT_BLOB)).transpose()?;
        let calibration = blob(
            &tmp,
            FUSED_BLOB.into(),
            &bincode::serialize(monitor.fused())?,
        )?;
        let probes = monitor
            .probes()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let bytes = bincode::serialize(&ProbeBlob {
                    sites: p.sites.clone(),
                    fused: p.fused.clone(),
                })?;
                Ok(ProbeEntry {
                    name: p.name().to_string(),
                    summary: p.summary.clone(),
                    blob: blob(&tmp, format!("probe-{i}.bin"), &bytes)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (name, bytes) in extra {
            write_synced(&tmp.join(name), bytes)?;
        }
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            format_version: if probes.is_empty() {
                FORMAT_VERSION_WITHOUT_PROBES
            } else {
                FORMAT_VERSION
            },
            probes,
            created_by: format!("actwatch {}", env!("CARGO_PKG_VERSION")),
            options: monitor.options().clone(),
            sites,
            joint,
            calibration,
            summary: monitor.summary().clone(),
            reference: reference.clone(),
        };
        // The manifest goes last: a directory without one is never a monitor.
        write_synced(&tmp.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
        sync_dir(&tmp)?;
        Ok(manifest)
    })();
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = durable::temporary_path(out)?;
    if out.exists() {
        fs::rename(out, &old).map_err(io_err(out))?;
    }
    fs::rename(&tmp, out).map_err(io_err(out))?;
    sync_dir(parent)?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(manifest)
}

fn read_blob(dir: &Path, entry: &BlobEntry) -> Result<Vec<u8>> {
    if entry.file.contains(['/', '\\']) || entry.file.starts_with('.') {
        return Err(Error::Artifact(format!(
            "blob name {:?} is not allowed",
            entry.file
        )));
    }
    let path = dir.join(&entry.file);
    let unreadable =
        |e: std::io::Error| Error::Artifact(format!("{}: cannot read blob: {e}", path.display()));
    let mismatch = |got: u64| {
        Error::Artifact(format!(
            "{}: checksum mismatch ({got} bytes, expected {}): the monitor is corrupt or half-written; refit it",
            path.display(),
            entry.bytes
        ))
    };
    let file = File::open(&path).map_err(unreadable)?;
    // The manifest's size is believed only once the file agrees with it (it may say anything:
    // nothing is allocated for it before), and reading stops just past it.
    let len = file.metadata().map_err(unreadable)?.len();
    if len != entry.bytes {
        return Err(mismatch(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(entry.bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 != entry.bytes || sha256_hex(&bytes) != entry.sha256 {
        return Err(mismatch(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Decodes a verified blob: `bincode::deserialize`'s encoding (so every artifact reads as
/// before), with the blob's length as the limit, as the checkpoints' frames are decoded: no
/// length inside it can make the decoder read (or allocate for) more than the blob holds.
fn decode_blob<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> bincode::Result<T> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
}

/// Reads only the manifest of the monitor in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = fs::read(&path).map_err(|e| {
        Error::Artifact(format!(
            "{}: not a monitor directory (cannot read {MANIFEST}: {e})",
            dir.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Artifact(format!("{}: corrupt manifest: {e}", path.display())))?;
    if manifest.format != FORMAT_NAME
        || !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version)
    {
        return Err(Error::Artifact(format!(
            "{}: format {} version {} is not supported (this build reads {FORMAT_NAME} versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
            path.display(),
            manifest.format,
            manifest.format_version
        )));
    }
    Ok(manifest)
}

/// Loads and verifies the monitor in `dir`, ready to score.
pub fn load_monitor(dir: &Path) -> Result<(Monitor, Manifest)> {
    let manifest = read_manifest(dir)?;
    let read_site = |entry: &SiteEntry| -> Result<SiteModel> {
        let bytes = read_blob(dir, &entry.blob)?;
        let mut site: SiteModel = decode_blob(&bytes).map_err(|e| {
            Error::Artifact(format!(
                "{}: cannot decode site {}: {e}",
                dir.display(),
                entry.name
            ))
        })?;
        // (The monitor's own invariants are checked by `Monitor::new` below.)
        if site.name != entry.name || site.dim != entry.dim {
            return Err(Error::Artifact(format!(
                "{}: site {} does not match the manifest",
                dir.display(),
                entry.name
            )));
        }
        entry.provenance.validate()?;
        site.provenance = entry.provenance.clone();
        if let Some(index) = &entry.index {
            // Verified like every blob; a graph that then does not fit its detector (a writer's
            // bug, or a hand-edited artifact) is refused by the detector and rebuilt.
            let bytes = read_blob(dir, index)?;
            let indexes: Vec<Option<KnnIndex>> = decode_blob(&bytes).map_err(|e| {
                Error::Artifact(format!(
                    "{}: cannot decode the index of site {}: {e}",
                    dir.display(),
                    entry.name
                ))
            })?;
            if indexes.len() != site.detectors.len() {
                return Err(Error::Artifact(format!(
                    "{}: the index of site {} holds {} detectors, the site {}",
                    dir.display(),
                    entry.name,
                    indexes.len(),
                    site.detectors.len()
                )));
            }
            for (d, index) in site.detectors.iter_mut().zip(indexes) {
                if let (FittedDetector::Knn(k), Some(index)) = (d, index) {
                    let _refused_then_rebuilt = k.offer_index(index);
                }
            }
        }
        Ok(site)
    };
    let sites = manifest
        .sites
        .iter()
        .map(read_site)
        .collect::<Result<Vec<_>>>()?;
    let joint = manifest.joint.as_ref().map(read_site).transpose()?;
    let bytes = read_blob(dir, &manifest.calibration)?;
    let fused = if manifest.format_version == 1 {
        decode_blob::<Calibration>(&bytes).map(LengthStrata::single)
    } else {
        decode_blob::<LengthStrata>(&bytes)
    }
    .map_err(|e| Error::Artifact(format!("{}: cannot decode calibration: {e}", dir.display())))?;
    if manifest.probes.len() != manifest.options.probes.len() {
        return Err(Error::Artifact(format!(
            "{}: {} probes stored, but the options ask for {}",
            dir.display(),
            manifest.probes.len(),
            manifest.options.probes.len()
        )));
    }
    let probes = manifest
        .probes
        .iter()
        .zip(&manifest.options.probes)
        .map(|(entry, spec)| {
            if entry.name != spec.name {
                return Err(Error::Artifact(format!(
                    "{}: probe {:?} stored where the options name {:?}",
                    dir.display(),
                    entry.name,
                    spec.name
                )));
            }
            let bytes = read_blob(dir, &entry.blob)?;
            let blob: ProbeBlob = decode_blob(&bytes).map_err(|e| {
                Error::Artifact(format!(
                    "{}: cannot decode probe {}: {e}",
                    dir.display(),
                    entry.name
                ))
            })?;
            Ok(ProbeModel {
                spec: spec.clone(),
                sites: blob.sites,
                fused: blob.fused,
                summary: entry.summary.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let monitor = Monitor::new(
        manifest.options.clone(),
        sites,
        joint,
        fused,
        manifest.summary.clone(),
        probes,
    )
    .map_err(|e| Error::Artifact(format!("{}: {e}", dir.display())))?;
    Ok((monitor, manifest))
}
