use crate::{Error, Result};

/// Element type of an activation tensor on the wire or on disk. Converted to `f32` once, at the edge.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Decodes little-endian `bytes` of `dtype` into `f32`, appending to `out`.
pub fn decode_le(bytes: &[u8], dtype: Dtype, out: &mut Vec<f32>) -> Result<()> {
    if !bytes.len().is_multiple_of(dtype.size()) {
        return Err(Error::Malformed(format!(
            "{} bytes is not a whole number of {:?} elements",
            bytes.len(),
            dtype
        )));
    }
    out.reserve(bytes.len() / dtype.size());
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        // A bfloat16 is the high half of an f32: a shift, which vectorises (`half`'s conversion
        // branches on NaN, which would only be refused by the finiteness check anyway).
        Dtype::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_dtype() {
        let vals = [1.5f32, -2.25, 0.0, 1024.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        for (b, d) in [(f32b, Dtype::F32), (f16b, Dtype::F16), (bf16b, Dtype::Bf16)] {
            let mut out = Vec::new();
            decode_le(&b, d, &mut out).unwrap();
            assert_eq!(out, vals);
        }
        let mut out = Vec::new();
        assert!(decode_le(&[0u8; 3], Dtype::F32, &mut out).is_err());
    }
}
