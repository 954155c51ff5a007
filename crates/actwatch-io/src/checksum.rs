//! The checksum of the files the server commits and checks before reading (its reference
//! segments): XXH3-128 of the file's bytes, as 32 lowercase hex digits.
//!
//! The decision a reader must know: it guards against bits flipped or files cut short on disk,
//! not against an adversary (whoever can rewrite a segment can rewrite the `state.json` that
//! records its checksum), so it need not be cryptographic. SHA-256 cost 0.5 ns a byte here
//! (about 2 GB/s with the SHA extensions), the largest single cost of an ingest after the kernel's
//! copy; XXH3 runs at memory speed. `state.json` files written before keep their SHA-256
//! (`SegmentEntry::sha256` in the server), still verified with [`sha256_file`].

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};
use twox_hash::XxHash3_128;

/// What the checksum is called where it is recorded.
pub const NAME: &str = "xxh3_128";

/// The checksum of bytes fed in order.
pub struct Hasher(XxHash3_128);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("checksum::Hasher")
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self(XxHash3_128::new())
    }
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// The checksum of everything fed so far (lowercase hex, 32 digits).
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.finish_128())
    }
}

/// The checksum of `bytes`.
pub fn of(bytes: &[u8]) -> String {
    format!("{:032x}", XxHash3_128::oneshot(bytes))
}

/// The checksum and length of the file at `path`, streamed.
pub fn file(path: &Path) -> io::Result<(String, u64)> {
    let mut h = Hasher::default();
    let len = stream(path, |b| h.update(b))?;
    Ok((h.hex(), len))
}

/// SHA-256 (lowercase hex) and length of the file at `path`, streamed: what segments committed
/// before XXH3 recorded.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let len = stream(path, |b| h.update(b))?;
    Ok((
        h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        len,
    ))
}

fn stream(path: &Path, mut f: impl FnMut(&[u8])) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(len),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        f(&buf[..n]);
        len += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streamed in any pieces, a file gets the checksum of its bytes; the SHA-256 is the one
    /// `sha2` gives; the known XXH3-128 of the empty input (the reference implementation's
    /// test vector) pins the algorithm.
    #[test]
    fn checksums_do_not_depend_on_how_the_bytes_are_fed() {
        assert_eq!(of(b""), "99aa06d3014798d86001c324468d497f");
        let bytes: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut h = Hasher::default();
        for piece in bytes.chunks(7_919) {
            h.update(piece);
        }
        assert_eq!(h.hex(), of(&bytes));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(file(&path).unwrap(), (of(&bytes), bytes.len() as u64));
        let sha: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha256_file(&path).unwrap(), (sha, bytes.len() as u64));
    }
}
