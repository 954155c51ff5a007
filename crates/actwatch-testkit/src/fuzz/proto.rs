//! Request decoding: bytes as every request that carries a `TraceBatch`, and each batch through
//! [`actwatch_proto::decode_trace_batch`] against an independent statement of its contract.

use actwatch_core::{Dtype, SiteBatch};
use actwatch_proto::{
    declared_rows, declared_width, decode_trace_batch, encode_trace_batch, provenance_from_proto,
    v1, ConversionError,
};
use prost::Message;

use super::Tally;
use crate::alloc::largest_allocation;

/// The most one allocation may take while prost decodes `len` bytes: every repeated field
/// grows by doubling, and an empty string (2 bytes on the wire) is a 24-byte `String`.
pub fn prost_budget(len: usize) -> usize {
    32 * len + (64 << 10)
}

/// The most one allocation may take while [`decode_trace_batch`] decodes a batch of `len`
/// encoded bytes: its vectors as `f32` (twice their f16 bytes), error messages, a constant.
pub fn decode_budget(len: usize) -> usize {
    4 * len + (64 << 10)
}

/// Decodes `bytes` as a `TraceBatch` and as each request that carries them
/// (`IngestReferenceRequest`, `StreamScoresRequest`, `ScoreRequest`), and checks every batch found
/// with [`check_batch`]. Panics on a broken property.
pub fn decode_requests(bytes: &[u8], tally: &mut Tally) {
    let mut batches = Vec::new();
    let (_, largest) = largest_allocation(|| {
        if let Ok(b) = v1::TraceBatch::decode(bytes) {
            batches.push(b);
        }
        if let Ok(r) = v1::IngestReferenceRequest::decode(bytes) {
            batches.extend(r.batch);
        }
        if let Ok(r) = v1::StreamScoresRequest::decode(bytes) {
            if let Some(v1::stream_scores_request::Event::Batch(b)) = r.event {
                batches.push(b);
            }
        }
        if let Ok(r) = v1::ScoreRequest::decode(bytes) {
            batches.extend(r.batches);
        }
    });
    let budget = prost_budget(bytes.len());
    assert!(
        largest <= budget,
        "prost allocated {largest} bytes at once for a {}-byte message (budget {budget})",
        bytes.len()
    );
    for b in batches {
        let _ = check_batch(b, tally);
    }
}

/// The values a batch must decode to, or `None` when its contract says it must be refused: a
/// site; a known dtype; a shape `[rows, cols]`, both non-zero, with one non-empty trace id per
/// row and `rows * cols * size_of(dtype)` bytes of data, every value finite; no positions or one
/// per row; a valid provenance if any. Stated independently of the decoder (only the provenance
/// rules are the core's own).
pub fn expected_values(b: &v1::TraceBatch) -> Option<Vec<f32>> {
    if b.site.is_empty() {
        return None;
    }
    if let Some(p) = &b.provenance {
        provenance_from_proto(p).ok()?;
    }
    let t = b.activations.as_ref()?;
    let size: u128 = match t.dtype {
        1 => 4,
        2 | 3 => 2,
        _ => return None,
    };
    let [rows, cols] = t.shape[..] else {
        return None;
    };
    if rows == 0 || cols == 0 || rows != b.trace_ids.len() as u64 {
        return None;
    }
    if u128::from(rows) * u128::from(cols) * size != t.data.len() as u128 {
        return None;
    }
    if b.trace_ids.iter().any(String::is_empty) {
        return None;
    }
    if !b.positions.is_empty() && b.positions.len() as u64 != rows {
        return None;
    }
    let values: Vec<f32> = match t.dtype {
        1 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        2 => t
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    };
    values.iter().all(|v| v.is_finite()).then_some(values)
}

/// A short description of a batch for failure messages (never its payload).
fn describe(b: &v1::TraceBatch) -> String {
    let t = b.activations.as_ref();
    format!(
        "site of {} bytes, {} trace ids, {} positions, shape {:?}, dtype {:?}, {} data bytes, provenance {}",
        b.site.len(),
        b.trace_ids.len(),
        b.positions.len(),
        t.map(|t| &t.shape[..t.shape.len().min(4)]),
        t.map(|t| t.dtype),
        t.map_or(0, |t| t.data.len()),
        b.provenance.is_some(),
    )
}

/// Decodes one batch and checks the properties: no panic (the caller's harness reports one);
/// `declared_rows` / `declared_width` readable before decoding; no single allocation beyond
/// [`decode_budget`] of its encoded size; accepted exactly when [`expected_values`] says so, and
/// then with its site, ids, positions, width and values. Returns the decoder's answer.
pub fn check_batch(batch: v1::TraceBatch, tally: &mut Tally) -> Result<SiteBatch, ConversionError> {
    tally.inputs += 1;
    let rows = declared_rows(&batch);
    let width = declared_width(&batch);
    let shape = batch.activations.as_ref().map(|t| t.shape.clone());
    if let Some(shape) = &shape {
        let first = shape
            .first()
            .map_or(0, |&r| usize::try_from(r).unwrap_or(usize::MAX));
        assert_eq!(rows, batch.trace_ids.len().max(first), "declared_rows");
        let second = shape
            .get(1)
            .map_or(0, |&w| usize::try_from(w).unwrap_or(usize::MAX));
        assert_eq!(width, second, "declared_width");
    }
    let expected = expected_values(&batch);
    let what = describe(&batch);
    let budget = decode_budget(batch.encoded_len());
    let (site, ids, positions) = (
        batch.site.clone(),
        batch.trace_ids.clone(),
        batch.positions.clone(),
    );
    let (result, largest) = largest_allocation(|| decode_trace_batch(batch));
    assert!(
        largest <= budget,
        "decoding allocated {largest} bytes at once (budget {budget}) for: {what}"
    );
    match (&result, expected) {
        (Ok(b), Some(values)) => {
            tally.accepted += 1;
            assert_eq!(b.site(), site);
            assert_eq!(b.trace_ids(), &ids[..]);
            assert_eq!(
                b.positions(),
                (!positions.is_empty()).then_some(&positions[..])
            );
            assert_eq!(b.dim(), width);
            assert_eq!(b.rows(), rows);
            let got: Vec<u32> = b.vectors().as_slice().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            assert!(got == want, "decoded values differ for: {what}");
        }
        (Err(_), None) => tally.refused += 1,
        (Ok(_), None) => panic!("accepted a batch its contract refuses: {what}"),
        (Err(e), Some(_)) => panic!("refused a valid batch ({e}): {what}"),
    }
    result
}

/// `values` as `dtype` holds them (f32 rounded to f16 / bf16 and back).
pub fn through_dtype(values: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => values.to_vec(),
        Dtype::F16 => values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
        Dtype::Bf16 => values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
    }
}

/// A valid batch through the wire and back: [`encode_trace_batch`], prost-encoded, prost-decoded,
/// [`decode_trace_batch`] ([`check_batch`]). It must come back with the values `dtype` holds, or
/// be refused exactly when one of them does not fit in `dtype` (f32 overflowing f16 is infinite).
pub fn round_trip(
    site: &str,
    trace_ids: Vec<String>,
    positions: Vec<i32>,
    dim: usize,
    values: &[f32],
    dtype: Dtype,
    tally: &mut Tally,
) {
    let wire = encode_trace_batch(site, trace_ids.clone(), positions, dim, values, dtype);
    let bytes = wire.encode_to_vec();
    let back = v1::TraceBatch::decode(&bytes[..]).expect("an encoded batch decodes");
    assert_eq!(back, wire, "prost round trip");
    let held = through_dtype(values, dtype);
    match check_batch(back, tally) {
        Ok(b) => {
            assert_eq!(b.trace_ids(), &trace_ids[..]);
            assert_eq!(b.vectors().as_slice(), &held[..]);
        }
        Err(ConversionError::Core(actwatch_core::Error::NonFinite { .. })) => {
            assert!(held.iter().any(|v| !v.is_finite()), "refused finite values")
        }
        Err(e) => panic!("a valid batch was refused: {e}"),
    }
}

/// Small valid requests of every kind that carries batches, encoded: the seeds of the mutation
/// fuzzing (and of the cargo-fuzz corpus).
pub fn seed_requests() -> Vec<(&'static str, Vec<u8>)> {
    let batch = |dtype: Dtype, positions: Vec<i32>| {
        let mut b = encode_trace_batch(
            "blocks.6.hook_resid_post",
            vec!["c0".into(), "c1".into(), "c2".into()],
            positions,
            4,
            &[
                0.5, -1.25, 3.0, 0.0, 1e-3, 2.5, -0.75, 8.0, 6e4, -6e4, 1.0, -2.0,
            ],
            dtype,
        );
        b.provenance = Some(v1::Provenance {
            model: "sentence-transformers/all-MiniLM-L6-v2".into(),
            pooling: "none".into(),
            ..Default::default()
        });
        b
    };
    vec![
        (
            "batch-f32",
            batch(Dtype::F32, vec![0, 1, 2]).encode_to_vec(),
        ),
        ("batch-f16", batch(Dtype::F16, vec![]).encode_to_vec()),
        (
            "batch-bf16",
            batch(Dtype::Bf16, vec![5, 6, 7]).encode_to_vec(),
        ),
        (
            "ingest",
            v1::IngestReferenceRequest {
                monitor: "m".into(),
                batch: Some(batch(Dtype::F32, vec![])),
                labels: vec![true, false, true],
            }
            .encode_to_vec(),
        ),
        (
            "stream",
            v1::StreamScoresRequest {
                event: Some(v1::stream_scores_request::Event::Batch(batch(
                    Dtype::F16,
                    vec![0, 1, 2],
                ))),
            }
            .encode_to_vec(),
        ),
        (
            "score",
            v1::ScoreRequest {
                monitor: "m".into(),
                batches: vec![batch(Dtype::Bf16, vec![]), batch(Dtype::F32, vec![1, 2, 3])],
                complete: true,
            }
            .encode_to_vec(),
        ),
    ]
}
