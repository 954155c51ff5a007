//! Framed byte formats of a fit (`actwatch_io::checkpoint`): fit states and calibration parts
//! shipped between workers, and fit checkpoints on disk. Each is a magic, a version, bincode and a
//! SHA-256 trailer; what decodes is then used as a fit in parts uses it.

use std::sync::OnceLock;

use actwatch_detect::monitor::{MonitorFitter, MonitorOptions};
use actwatch_io::checkpoint::{
    calibration_part_from_bytes, calibration_part_to_bytes, fitter_from_bytes, fitter_to_bytes,
    load_checkpoint, save_checkpoint, FitCheckpoint,
};
use actwatch_io::pipeline::NoProgress;
use actwatch_io::pipeline::{calibrate_batch, fold_examples, fold_reference, ExampleInput};
use actwatch_io::reader::TraceReader;
use sha2::Digest;

use super::artifacts::{reference, seed_options};
use super::Tally;
use crate::alloc::largest_allocation;

/// Which format bytes are read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// [`fitter_from_bytes`].
    FitState,
    /// [`calibration_part_from_bytes`].
    CalibrationPart,
    /// [`load_checkpoint`] (the bytes written to a file first).
    Checkpoint,
}

impl FrameKind {
    pub const ALL: [FrameKind; 3] = [
        FrameKind::FitState,
        FrameKind::CalibrationPart,
        FrameKind::Checkpoint,
    ];
}

/// One fit's frames: the fitter they came from, and its fit state, calibration part (none for a
/// monitor with probes: a fit in parts cannot fit them) and checkpoint as bytes.
pub struct FrameSeeds {
    pub name: &'static str,
    pub options: MonitorOptions,
    pub fitter: MonitorFitter,
    pub fit_state: Vec<u8>,
    pub calibration_part: Option<Vec<u8>>,
    pub checkpoint: Vec<u8>,
}

impl FrameSeeds {
    /// The seed bytes of `kind`, when this fit has them.
    pub fn bytes(&self, kind: FrameKind) -> Option<&[u8]> {
        match kind {
            FrameKind::FitState => Some(&self.fit_state),
            FrameKind::CalibrationPart => self.calibration_part.as_deref(),
            FrameKind::Checkpoint => Some(&self.checkpoint),
        }
    }
}

/// The seed frames, one set per [`seed_options`], folded from [`reference`] (once per process).
pub fn frame_seeds() -> &'static [FrameSeeds] {
    static SEEDS: OnceLock<Vec<FrameSeeds>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let r = reference();
        let examples = ExampleInput::new(std::slice::from_ref(&r.examples), &r.read, "label")
            .expect("examples");
        let dir = tempfile::tempdir().expect("a temporary directory");
        seed_options()
            .into_iter()
            .map(|(name, options)| {
                let mut fitter = MonitorFitter::new(options.clone()).expect("valid options");
                fold_reference(&mut fitter, &r.files, &r.read, &NoProgress).expect("folding");
                if !options.probes.is_empty() {
                    fold_examples(&mut fitter, &examples, &NoProgress).expect("folding examples");
                }
                let calibration_part = options.probes.is_empty().then(|| {
                    let mut cal = fitter.clone().finish_fit().expect("finishing the fit");
                    for batch in TraceReader::open(&r.files, r.read.clone()).expect("a reader") {
                        calibrate_batch(&mut cal, &batch.expect("a batch")).expect("calibrating");
                    }
                    calibration_part_to_bytes(&cal.take_part().expect("a part")).expect("bytes")
                });
                let path = dir.path().join(format!("{name}.bin"));
                save_checkpoint(
                    &FitCheckpoint {
                        folded: vec!["reference.parquet".into()],
                        fitter: fitter.clone(),
                    },
                    &path,
                )
                .expect("saving a checkpoint");
                FrameSeeds {
                    name,
                    fit_state: fitter_to_bytes(&fitter).expect("bytes"),
                    calibration_part,
                    checkpoint: std::fs::read(&path).expect("reading a checkpoint"),
                    options,
                    fitter,
                }
            })
            .collect()
    })
}

/// Recomputes a frame's SHA-256 trailer (its last 32 bytes) over everything before it, as a
/// writer that meant the bytes would have: the frame then reaches the decoder.
pub fn reseal(bytes: &mut [u8]) {
    if bytes.len() < 32 {
        return;
    }
    let (body, trailer) = bytes.split_at_mut(bytes.len() - 32);
    trailer.copy_from_slice(&sha2::Sha256::digest(body));
}

/// The most one allocation may take while decoding a frame of `len` bytes (bincode bounded by
/// the frame's length, serde's cautious preallocation of 1 MiB, a constant).
pub fn decode_budget(len: usize) -> usize {
    8 * len + (4 << 20)
}

/// Reads `bytes` as `kind` against the fit `seeds`: no panic, no single allocation beyond
/// [`decode_budget`] while decoding; with `must_refuse`, the bytes differ from a valid frame and
/// were not resealed, so they must be refused as damaged ("checksum" mismatch, or "truncated").
/// What decodes is used: a fit state (or a checkpoint's fitter) is encoded again (the same bytes
/// back), merged into an empty part of the seed fit, finished, given the seed's calibration part
/// and made a monitor; a calibration part is absorbed by the seed fit's calibrator and made a
/// monitor.
pub fn check_frame(
    seeds: &FrameSeeds,
    kind: FrameKind,
    bytes: &[u8],
    must_refuse: bool,
    tally: &mut Tally,
) {
    let budget = decode_budget(bytes.len());
    let checked = |largest: usize| {
        assert!(
            largest <= budget,
            "decoding a {}-byte {kind:?} allocated {largest} bytes at once (budget {budget})",
            bytes.len()
        )
    };
    let refused = |e: &actwatch_io::Error| {
        if must_refuse {
            let e = e.to_string();
            assert!(
                e.contains("checksum") || e.contains("truncated"),
                "damaged {kind:?} refused for another reason: {e}"
            );
        }
    };
    match kind {
        FrameKind::FitState | FrameKind::Checkpoint => {
            let (decoded, largest) = if kind == FrameKind::FitState {
                largest_allocation(|| fitter_from_bytes(bytes))
            } else {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let path = dir.path().join("fitter.bin");
                std::fs::write(&path, bytes).expect("writing a checkpoint");
                let (r, largest) = largest_allocation(|| load_checkpoint(&path));
                (r.map(|ck| ck.fitter), largest)
            };
            checked(largest);
            tally.record(&decoded);
            match decoded {
                Ok(_) if must_refuse => panic!("a damaged {kind:?} was decoded"),
                Ok(fitter) => use_fitter(seeds, fitter),
                Err(e) => refused(&e),
            }
        }
        FrameKind::CalibrationPart => {
            let (decoded, largest) = largest_allocation(|| calibration_part_from_bytes(bytes));
            checked(largest);
            tally.record(&decoded);
            match decoded {
                Ok(_) if must_refuse => panic!("a damaged {kind:?} was decoded"),
                Ok(part) => {
                    if let Ok(mut cal) = seeds.fitter.clone().finish_fit() {
                        if cal.absorb(part).is_ok() {
                            let _ = cal.finish().map(|m| super::artifacts::score(&m));
                        }
                    }
                }
                Err(e) => refused(&e),
            }
        }
    }
}

/// Uses a decoded fitter as a fit in parts would (see [`check_frame`]).
fn use_fitter(seeds: &FrameSeeds, fitter: MonitorFitter) {
    let again = fitter_to_bytes(&fitter).expect("a decoded fitter encodes");
    let back = fitter_from_bytes(&again).expect("a re-encoded fitter decodes");
    let third = fitter_to_bytes(&back).expect("encodes");
    if third != again {
        let at = third.iter().zip(&again).position(|(a, b)| a != b);
        panic!(
            "{}: a decoded fit state does not encode to the same bytes twice ({} vs {} bytes, first difference at {at:?})",
            seeds.name,
            again.len(),
            third.len()
        );
    }
    let _ = fitter.fit_traces();
    let mut merged = seeds.fitter.part();
    let _ = merged.merge(fitter.clone());
    let Ok(mut cal) = fitter.finish_fit() else {
        return;
    };
    if let Some(part) = &seeds.calibration_part {
        let part = calibration_part_from_bytes(part).expect("the seed part decodes");
        if cal.absorb(part).is_err() {
            return;
        }
    }
    let _ = cal.finish().map(|m| super::artifacts::score(&m));
}
