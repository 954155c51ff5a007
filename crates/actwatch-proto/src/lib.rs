//! actwatch-proto: the `actwatch.v1` gRPC API and its conversions to core types.
//!
//! The generated code (tonic + prost, from `proto/actwatch/v1/actwatch.proto`) lives in [`v1`];
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC reflection. The decision a reader must know: tensor payloads
//! are `bytes::Bytes` (prost's `bytes` option), so a batch's activations are sliced out of the
//! request buffer without a copy and converted to `f32` exactly once, in [`decode_trace_batch`],
//! which also validates everything a batch promises (shape, row counts, byte length, finiteness)
//! before any other code sees it, and hands on the core's [`SiteBatch`]. Conversions destructure proto messages completely, so a field
//! added to the proto breaks the build where it has to be handled.

use actwatch_core::{decode_le, Dtype, Provenance, SiteBatch, Vectors};

/// Generated messages, client and server of `actwatch.v1` (prost-build marks every generated
/// type `#[allow(clippy::all)]` itself).
pub mod v1 {
    tonic::include_proto!("actwatch.v1");
}

/// Encoded `FileDescriptorSet` of `actwatch.v1`, for the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/actwatch_v1_descriptor.bin"));

/// Why a message could not be converted. Every variant is a problem with the client's input.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConversionError {
    /// A required field is absent or empty.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field has a value that is not allowed; `message` says why.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The decoded vectors are bad (non-finite value, malformed buffer).
    #[error(transparent)]
    Core(#[from] actwatch_core::Error),
}

impl ConversionError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ConversionError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// The element type named by a proto `DType` value.
pub fn dtype_from_proto(value: i32) -> Result<Dtype, ConversionError> {
    match v1::DType::try_from(value) {
        Ok(v1::DType::DtypeF32) => Ok(Dtype::F32),
        Ok(v1::DType::DtypeF16) => Ok(Dtype::F16),
        Ok(v1::DType::DtypeBf16) => Ok(Dtype::Bf16),
        Ok(v1::DType::DtypeUnspecified) => Err(ConversionError::invalid(
            "activations.dtype",
            "dtype is unspecified (use DTYPE_F32, DTYPE_F16 or DTYPE_BF16)",
        )),
        Err(_) => Err(ConversionError::invalid(
            "activations.dtype",
            format!("unknown dtype value {value}"),
        )),
    }
}

/// The proto `DType` of a core [`Dtype`].
pub fn dtype_to_proto(dtype: Dtype) -> v1::DType {
    match dtype {
        Dtype::F32 => v1::DType::DtypeF32,
        Dtype::F16 => v1::DType::DtypeF16,
        Dtype::Bf16 => v1::DType::DtypeBf16,
    }
}

/// The number of rows a batch claims (its trace ids), readable before decoding so that limits
/// can be enforced before any allocation.
pub fn declared_rows(batch: &v1::TraceBatch) -> usize {
    let from_shape = batch
        .activations
        .as_ref()
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(0);
    batch
        .trace_ids
        .len()
        .max(usize::try_from(from_shape).unwrap_or(usize::MAX))
}

/// The vector width a batch claims (its shape's second dimension), readable before decoding.
pub fn declared_width(batch: &v1::TraceBatch) -> usize {
    batch
        .activations
        .as_ref()
        .and_then(|t| t.shape.get(1).copied())
        .map_or(0, |w| usize::try_from(w).unwrap_or(usize::MAX))
}

/// Validates a proto batch and decodes its activations to `f32`, into the core's [`SiteBatch`].
///
/// Checks, in order: a non-empty site; a tensor; a known dtype; a shape of exactly `[rows, cols]`
/// with `cols > 0`; `rows == trace_ids.len()` (and at least one row);
/// `data.len() == rows * cols * size_of(dtype)` (all before anything is allocated); every decoded
/// value finite; then the batch's own invariants ([`SiteBatch::new`]: no empty trace id, positions
/// empty or one per row).
pub fn decode_trace_batch(batch: v1::TraceBatch) -> Result<SiteBatch, ConversionError> {
    let v1::TraceBatch {
        site,
        activations,
        trace_ids,
        positions,
        provenance,
    } = batch;
    if site.is_empty() {
        return Err(ConversionError::Missing("site"));
    }
    let provenance = provenance
        .map(|p| provenance_from_proto(&p))
        .transpose()?
        .map(std::sync::Arc::new);
    let v1::Tensor { data, shape, dtype } =
        activations.ok_or(ConversionError::Missing("activations"))?;
    let dtype = dtype_from_proto(dtype)?;
    let [rows, cols] = shape[..] else {
        // Quoted as an excerpt: the client chose its length.
        let quoted = if shape.len() <= 4 {
            format!("{shape:?}")
        } else {
            format!("{:?} ...", &shape[..4])
        };
        return Err(ConversionError::invalid(
            "activations.shape",
            format!(
                "shape must be [rows, cols], got {quoted} ({} dimensions)",
                shape.len()
            ),
        ));
    };
    let (rows, cols) = match (usize::try_from(rows), usize::try_from(cols)) {
        (Ok(r), Ok(c)) => (r, c),
        _ => {
            return Err(ConversionError::invalid(
                "activations.shape",
                format!("shape {shape:?} does not fit in memory"),
            ))
        }
    };
    if cols == 0 {
        return Err(ConversionError::invalid(
            "activations.shape",
            "the vector width (cols) is zero",
        ));
    }
    if rows == 0 {
        return Err(ConversionError::invalid(
            "activations.shape",
            "the batch has no rows",
        ));
    }
    if rows != trace_ids.len() {
        return Err(ConversionError::invalid(
            "trace_ids",
            format!(
                "{} trace ids for {rows} rows (shape {shape:?}): one id per row is required",
                trace_ids.len()
            ),
        ));
    }
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(dtype.size()));
    if expected != Some(data.len()) {
        return Err(ConversionError::invalid(
            "activations.data",
            format!(
                "{} bytes, but shape [{rows}, {cols}] of {dtype:?} needs {} bytes",
                data.len(),
                expected.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
            ),
        ));
    }
    let mut values = Vec::with_capacity(rows * cols);
    decode_le(&data, dtype, &mut values)?;
    let vectors = Vectors::new_finite(cols, values)?;
    let positions = (!positions.is_empty()).then_some(positions);
    Ok(SiteBatch::new(site, trace_ids, positions, vectors)?.with_provenance(provenance))
}

/// The core [`Provenance`] of a proto one ("" = undeclared); values over the length limit or
/// with control characters are refused.
pub fn provenance_from_proto(p: &v1::Provenance) -> Result<Provenance, ConversionError> {
    Provenance::from_pairs([
        ("model", p.model.as_str()),
        ("revision", p.revision.as_str()),
        ("capture", p.capture.as_str()),
        ("pooling", p.pooling.as_str()),
        ("dtype", p.dtype.as_str()),
    ])
    .map_err(ConversionError::Core)
}

/// The proto form of a core [`Provenance`].
pub fn provenance_to_proto(p: &Provenance) -> v1::Provenance {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    v1::Provenance {
        model: s(&p.model),
        revision: s(&p.revision),
        capture: s(&p.capture),
        pooling: s(&p.pooling),
        dtype: s(&p.dtype),
    }
}

/// Encodes `f32` rows as a proto batch (little-endian bytes of `dtype`), for clients and tests.
pub fn encode_trace_batch(
    site: &str,
    trace_ids: Vec<String>,
    positions: Vec<i32>,
    dim: usize,
    values: &[f32],
    dtype: Dtype,
) -> v1::TraceBatch {
    let mut data = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::Bf16 => values
            .iter()
            .for_each(|v| data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
    let rows = values.len().checked_div(dim).unwrap_or(0);
    v1::TraceBatch {
        site: site.to_string(),
        activations: Some(v1::Tensor {
            data: data.into(),
            shape: vec![rows as u64, dim as u64],
            dtype: dtype_to_proto(dtype) as i32,
        }),
        trace_ids,
        positions,
        provenance: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(dtype: Dtype) -> v1::TraceBatch {
        encode_trace_batch(
            "layer.1",
            vec!["a".into(), "b".into()],
            vec![],
            3,
            &[1.0, -2.5, 0.0, 4.0, 0.5, -1.0],
            dtype,
        )
    }

    #[test]
    fn decodes_every_dtype() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let d = decode_trace_batch(batch(dtype)).unwrap();
            assert_eq!(d.site(), "layer.1");
            assert_eq!(d.dim(), 3);
            assert_eq!(d.vectors().as_slice(), &[1.0, -2.5, 0.0, 4.0, 0.5, -1.0]);
            assert_eq!(d.positions(), None);
        }
    }

    #[test]
    fn rejects_bad_batches_precisely() {
        let mut b = batch(Dtype::F32);
        b.activations.as_mut().unwrap().shape = vec![6];
        let e = decode_trace_batch(b).unwrap_err().to_string();
        assert!(e.contains("[rows, cols]"), "{e}");

        let mut b = batch(Dtype::F32);
        b.trace_ids.pop();
        let e = decode_trace_batch(b).unwrap_err().to_string();
        assert!(e.contains("1 trace ids for 2 rows"), "{e}");

        let mut b = batch(Dtype::F32);
        b.positions = vec![1];
        let e = decode_trace_batch(b).unwrap_err().to_string();
        assert!(e.contains("positions"), "{e}");

        // f16 bytes declared as f32: half the bytes the shape needs.
        let mut b = batch(Dtype::F16);
        b.activations.as_mut().unwrap().dtype = v1::DType::DtypeF32 as i32;
        let e = decode_trace_batch(b).unwrap_err().to_string();
        assert!(
            e.contains("12 bytes, but shape [2, 3] of F32 needs 24 bytes"),
            "{e}"
        );

        let mut b = batch(Dtype::F32);
        b.activations.as_mut().unwrap().dtype = 0;
        assert!(decode_trace_batch(b).is_err());

        let mut b = encode_trace_batch(
            "s",
            vec!["a".into()],
            vec![],
            2,
            &[1.0, f32::NAN],
            Dtype::F32,
        );
        let e = decode_trace_batch(b.clone()).unwrap_err();
        assert!(matches!(
            e,
            ConversionError::Core(actwatch_core::Error::NonFinite {
                row: 0,
                component: 1,
                ..
            })
        ));
        b.site.clear();
        assert_eq!(
            decode_trace_batch(b).unwrap_err(),
            ConversionError::Missing("site")
        );
    }

    #[test]
    fn declared_rows_reads_shape_and_ids() {
        let mut b = batch(Dtype::F32);
        assert_eq!(declared_rows(&b), 2);
        b.activations.as_mut().unwrap().shape = vec![1_000_000, 3];
        assert_eq!(declared_rows(&b), 1_000_000);
    }
}
