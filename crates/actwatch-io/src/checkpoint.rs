//! Fit checkpoints: a [`MonitorFitter`] (sufficient statistics, kNN samples) saved with the
//! list of reference files folded into it, so a later fit folds only the files that arrived since
//! and recalibrates: an incremental update that gives exactly what a full refit gives.
//!
//! One file: a 16-byte magic, a little-endian u32 format version, the bincode payload, and a
//! SHA-256 of everything before it as a 32-byte trailer. It is written and hashed as a stream (a
//! fitter can hold up to a million reference vectors per site, so it is never built in memory
//! twice), fsynced under a temporary name and renamed into place. Loading checks the trailer
//! before decoding anything, then the magic and the version; decoding is bounded by the file size.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use actwatch_detect::monitor::{CalibrationPart, MonitorFitter};
use bincode::Options;
use sha2::{Digest, Sha256};

use crate::durable::AtomicFile;
use crate::{Error, Result};

const MAGIC: &[u8; 16] = b"actwatch-fitter\0";
/// Bumped whenever the payload encoding changes incompatibly. Version 2: the fitter records
/// each site's provenance. Version 3: it holds the probes' labelled examples. Version 4: Gaussian
/// fitters hold their pending grid rows, kNN fitters sample by key. (An older checkpoint is
/// refused, and a served fit then refits from scratch.)
pub const CHECKPOINT_VERSION: u32 = 4;
const TRAILER: u64 = 32;

/// A fitter and, in order, the reference files (as the caller names them) folded into it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct FitCheckpoint {
    pub folded: Vec<String>,
    pub fitter: MonitorFitter,
}

/// Hashes everything written through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Artifact(format!("{}: fit checkpoint {what}", path.display()))
}

/// Writes `checkpoint` to `path`, atomically replacing any checkpoint there (through the one
/// durable write, [`AtomicFile`]).
pub fn save_checkpoint(checkpoint: &FitCheckpoint, path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut w = HashingWriter {
        inner: BufWriter::new(AtomicFile::create(path)?),
        hasher: Sha256::new(),
    };
    w.write_all(MAGIC).map_err(io)?;
    w.write_all(&CHECKPOINT_VERSION.to_le_bytes()).map_err(io)?;
    codec()
        .serialize_into(&mut w, checkpoint)
        .map_err(|e| match *e {
            // The file could not be written (a full disk, say): an io error, not a bad checkpoint.
            bincode::ErrorKind::Io(source) => io(source),
            e => Error::Artifact(format!("cannot encode the fit checkpoint: {e}")),
        })?;
    let digest = w.hasher.finalize_reset();
    let mut file = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.write_all(&digest).map_err(io)?;
    file.commit()
}

/// Reads and verifies the checkpoint at `path`.
pub fn load_checkpoint(path: &Path) -> Result<FitCheckpoint> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    let header = MAGIC.len() as u64 + 4;
    if len < header + TRAILER {
        return Err(corrupt(path, format!("is truncated ({len} bytes)")));
    }
    // Verify the whole file before decoding a byte of it.
    let mut f = BufReader::new(File::open(path).map_err(io)?);
    let mut hasher = Sha256::new();
    std::io::copy(&mut (&mut f).take(len - TRAILER), &mut hasher).map_err(io)?;
    let mut trailer = [0u8; TRAILER as usize];
    f.read_exact(&mut trailer).map_err(io)?;
    if hasher.finalize().as_slice() != trailer {
        return Err(corrupt(path, "checksum mismatch: corrupt or half-written"));
    }

    let mut f = BufReader::new(File::open(path).map_err(io)?);
    let mut head = [0u8; 20];
    f.read_exact(&mut head).map_err(io)?;
    if &head[..16] != MAGIC {
        return Err(corrupt(path, "has the wrong magic: not a fit checkpoint"));
    }
    let version = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
    if version != CHECKPOINT_VERSION {
        return Err(corrupt(
            path,
            format!("version {version} is not supported (this build reads {CHECKPOINT_VERSION})"),
        ));
    }
    codec()
        .with_limit(len)
        .deserialize_from(f.take(len - header - TRAILER))
        .map_err(|e| corrupt(path, format!("cannot be decoded: {e}")))
}

const FIT_STATE_MAGIC: &[u8; 16] = b"actwatch-fitpart";
const CALIBRATION_MAGIC: &[u8; 16] = b"actwatch-calpart";

/// `value` framed for another process (a fit in parts: a fit state, a calibration part): magic,
/// the checkpoint format version, bincode, SHA-256 of all that.
fn encode_framed<T: serde::Serialize>(magic: &[u8; 16], value: &T) -> Result<Vec<u8>> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    codec()
        .serialize_into(&mut out, value)
        .map_err(|e| Error::Artifact(format!("cannot encode: {e}")))?;
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// Reads what [`encode_framed`] wrote, verified before a byte is decoded.
fn decode_framed<T: serde::de::DeserializeOwned>(
    magic: &[u8; 16],
    bytes: &[u8],
    what: &str,
) -> Result<T> {
    let bad = |m: String| Error::Artifact(format!("{what}: {m}"));
    let header = magic.len() + 4;
    if bytes.len() < header + TRAILER as usize {
        return Err(bad(format!("truncated ({} bytes)", bytes.len())));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER as usize);
    if Sha256::digest(body).as_slice() != trailer {
        return Err(bad("checksum mismatch: corrupt or cut short".into()));
    }
    if &body[..16] != magic {
        return Err(bad(format!("wrong magic: not a {what}")));
    }
    let version = u32::from_le_bytes(body[16..20].try_into().expect("4 bytes"));
    if version != CHECKPOINT_VERSION {
        return Err(bad(format!(
            "version {version} is not supported (this build reads {CHECKPOINT_VERSION})"
        )));
    }
    codec()
        .with_limit(bytes.len() as u64)
        .deserialize(&body[header..])
        .map_err(|e| bad(format!("cannot be decoded: {e}")))
}

/// A fit state (a [`MonitorFitter`] of one part, or of merged parts) as bytes for another process.
pub fn fitter_to_bytes(fitter: &MonitorFitter) -> Result<Vec<u8>> {
    encode_framed(FIT_STATE_MAGIC, fitter)
}

/// The fit state [`fitter_to_bytes`] wrote; damaged or foreign bytes are refused.
pub fn fitter_from_bytes(bytes: &[u8]) -> Result<MonitorFitter> {
    decode_framed(FIT_STATE_MAGIC, bytes, "fit state")
}

/// A calibration part as bytes for another process.
pub fn calibration_part_to_bytes(part: &CalibrationPart) -> Result<Vec<u8>> {
    encode_framed(CALIBRATION_MAGIC, part)
}

/// The calibration part [`calibration_part_to_bytes`] wrote; damaged or foreign bytes are refused.
pub fn calibration_part_from_bytes(bytes: &[u8]) -> Result<CalibrationPart> {
    decode_framed(CALIBRATION_MAGIC, bytes, "calibration part")
}

#[cfg(test)]
mod tests {
    use super::*;
    use actwatch_detect::monitor::MonitorOptions;

    fn fitter() -> MonitorFitter {
        let mut f = MonitorFitter::new(MonitorOptions::default()).unwrap();
        let rows: Vec<f32> = (0..64 * 8).map(|i| ((i * 37) % 101) as f32 / 7.0).collect();
        f.push_fit("layer", &rows, 8).unwrap();
        f
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fitter.bin");
        let ck = FitCheckpoint {
            folded: vec!["a.parquet".into(), "b.parquet".into()],
            fitter: fitter(),
        };
        save_checkpoint(&ck, &path).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["fitter.bin"], "no temporary file is left");
        let back = load_checkpoint(&path).unwrap();
        assert_eq!(back.folded, ck.folded);
        assert_eq!(back.fitter.fit_traces(), 64);
        assert_eq!(
            bincode::serialize(&back.fitter).unwrap(),
            bincode::serialize(&ck.fitter).unwrap()
        );

        let bytes = fs::read(&path).unwrap();
        // A flipped byte anywhere, a truncation, or a foreign file: refused, never decoded.
        for damaged in [
            {
                let mut b = bytes.clone();
                b[bytes.len() / 2] ^= 1;
                b
            },
            bytes[..bytes.len() - 1].to_vec(),
            bytes[..10].to_vec(),
            b"not a checkpoint at all, just some text of some length......".to_vec(),
        ] {
            fs::write(&path, &damaged).unwrap();
            let err = load_checkpoint(&path).err().expect("damage is detected");
            assert!(err.to_string().contains("fit checkpoint"), "{err}");
        }
    }
}
