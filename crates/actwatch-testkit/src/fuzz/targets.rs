//! The bodies of the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs` call these with libFuzzer's
//! bytes), and their seed corpus ([`write_corpus`]). Each decodes its bytes into one input of a
//! harness, and the harness checks the same properties as the seeded suites.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use actwatch_io::artifact::MANIFEST;

use super::artifacts::{check_artifact, reseal, seed_monitors};
use super::frames::{self, check_frame, frame_seeds, FrameKind};
use super::proto::{decode_requests, seed_requests};
use super::traces::{read_budget, read_trace_file, seed_trace_files};
use super::Tally;
use crate::alloc::largest_allocation;

/// The names of the targets that take bytes through this module, as `fuzz/Cargo.toml` names
/// them (`proto_batch`, the fifth, builds its input with `arbitrary` in its own file).
pub const TARGETS: [&str; 4] = [
    "proto_requests",
    "trace_reader",
    "monitor_artifact",
    "fit_frames",
];

/// A file in this process's scratch directory (temporary, made once).
fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
        .path()
        .join(name)
}

/// `proto_requests`: the bytes as every request that carries a `TraceBatch`
/// ([`decode_requests`]).
pub fn proto_requests(data: &[u8]) {
    decode_requests(data, &mut Tally::default());
}

/// `trace_reader`: byte 0 picks the reader options ([`super::traces::read_options`]), the rest
/// is a Parquet file, read to the end ([`read_trace_file`]) within [`read_budget`].
pub fn trace_reader(data: &[u8]) {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    let path = scratch("input.parquet");
    std::fs::write(&path, file).expect("writing the input");
    let budget = read_budget(file.len());
    let (_, largest) = largest_allocation(|| read_trace_file(&path, selector));
    assert!(
        largest <= budget,
        "reading a {}-byte file allocated {largest} bytes at once (budget {budget})",
        file.len()
    );
}

/// `monitor_artifact`: byte 0 picks a seed monitor (bits 0-1) and whether the manifest is
/// resealed (bit 2), byte 1 one of its files; the rest replaces that file, and the directory is
/// loaded and scored ([`check_artifact`]). A blob changed without resealing must be refused.
pub fn monitor_artifact(data: &[u8]) {
    let [mode, file, content @ ..] = data else {
        return;
    };
    let seeds = seed_monitors();
    let seed = &seeds[usize::from(mode & 3) % seeds.len()];
    let names: Vec<&String> = seed.files.keys().collect();
    let name = names[usize::from(*file) % names.len()].clone();
    let mut files = seed.files.clone();
    let changed = files[&name] != content;
    files.insert(name.clone(), content.to_vec());
    let resealed = mode & 4 != 0;
    if resealed {
        reseal(&mut files, &name);
    }
    let must_refuse = (!resealed && changed && name != MANIFEST).then_some("checksum");
    check_artifact(&files, must_refuse, &mut Tally::default());
}

/// `fit_frames`: byte 0 picks a seed fit (bits 0-1), a format (bits 2-3: fit state, calibration
/// part, checkpoint) and whether the frame is resealed (bit 4); the rest is the frame, decoded
/// and used ([`check_frame`]). A frame that differs from the seed's without resealing must be
/// refused as damaged.
pub fn fit_frames(data: &[u8]) {
    let Some((&mode, frame)) = data.split_first() else {
        return;
    };
    let seeds = frame_seeds();
    let seed = &seeds[usize::from(mode & 3) % seeds.len()];
    let kind = FrameKind::ALL[usize::from((mode >> 2) & 3) % FrameKind::ALL.len()];
    let Some(original) = seed.bytes(kind) else {
        return;
    };
    let resealed = mode & 16 != 0;
    let mut bytes = frame.to_vec();
    if resealed {
        frames::reseal(&mut bytes);
    }
    let must_refuse = !resealed && bytes != original;
    check_frame(seed, kind, &bytes, must_refuse, &mut Tally::default());
}

/// Writes the seed corpus of every target in [`TARGETS`] under `dir/<target>/`: the small valid
/// inputs of the seeded suites, encoded as each target reads its bytes. Returns the number of
/// files written.
pub fn write_corpus(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let mut put = |target: &str, name: String, bytes: Vec<u8>| -> std::io::Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
        n += 1;
        Ok(())
    };
    for (name, bytes) in seed_requests() {
        put("proto_requests", name.to_string(), bytes)?;
    }
    for seed in seed_trace_files() {
        for options in [0u8, 1, 4, 8] {
            let mut input = vec![seed.selector | options];
            input.extend_from_slice(&seed.bytes);
            put("trace_reader", format!("{}-{options}", seed.name), input)?;
        }
    }
    for (s, seed) in seed_monitors().iter().enumerate() {
        for (f, (file, bytes)) in seed.files.iter().enumerate() {
            for resealed in [0u8, 4] {
                let mut input = vec![s as u8 | resealed, f as u8];
                input.extend_from_slice(bytes);
                put(
                    "monitor_artifact",
                    format!("{}-{file}-{resealed}", seed.name),
                    input,
                )?;
            }
        }
    }
    for (s, seed) in frame_seeds().iter().enumerate() {
        for (k, kind) in FrameKind::ALL.iter().enumerate() {
            let Some(bytes) = seed.bytes(*kind) else {
                continue;
            };
            for resealed in [0u8, 16] {
                let mut input = vec![s as u8 | (k as u8) << 2 | resealed];
                input.extend_from_slice(bytes);
                put(
                    "fit_frames",
                    format!("{}-{kind:?}-{resealed}", seed.name),
                    input,
                )?;
            }
        }
    }
    Ok(n)
}
