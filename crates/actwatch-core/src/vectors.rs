use crate::{error::FloatDisplay, Error, Result};

/// A batch of vectors of one width, row-major, contiguous `f32`.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Vectors {
    dim: usize,
    data: Vec<f32>,
}

impl Vectors {
    /// Wraps `data` as rows of `dim` values. Fails if `dim` is zero or does not divide the length.
    pub fn new(dim: usize, data: Vec<f32>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Malformed("vector width is zero".into()));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(Error::Malformed(format!(
                "{} values is not a whole number of rows of width {dim}",
                data.len()
            )));
        }
        Ok(Self { dim, data })
    }

    /// An empty batch of width `dim`.
    pub fn empty(dim: usize) -> Self {
        Self {
            dim,
            data: Vec::new(),
        }
    }

    /// Like [`Vectors::new`], and also rejects NaN and infinities.
    pub fn new_finite(dim: usize, data: Vec<f32>) -> Result<Self> {
        let v = Self::new(dim, data)?;
        v.check_finite()?;
        Ok(v)
    }

    /// Fails on the first NaN or infinite value, naming its row and component.
    pub fn check_finite(&self) -> Result<()> {
        if let Some(i) = self.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                row: i / self.dim,
                component: i % self.dim,
                value: FloatDisplay(self.data[i]),
            });
        }
        Ok(())
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_inner(self) -> Vec<f32> {
        self.data
    }

    /// Appends one row; fails if its width differs.
    pub fn push_row(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.dim {
            return Err(Error::WidthMismatch {
                expected: self.dim,
                got: row.len(),
            });
        }
        self.data.extend_from_slice(row);
        Ok(())
    }

    /// Appends all rows of `other`; fails if its width differs.
    pub fn extend(&mut self, other: &Vectors) -> Result<()> {
        if other.dim != self.dim {
            return Err(Error::WidthMismatch {
                expected: self.dim,
                got: other.dim,
            });
        }
        self.data.extend_from_slice(&other.data);
        Ok(())
    }
}

/// Scales every row of `data` (rows of `dim`) to unit Euclidean norm; zero rows stay zero.
pub fn l2_normalize_rows(data: &mut [f32], dim: usize) {
    for row in data.chunks_exact_mut(dim) {
        let norm = row
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            let inv = (1.0 / norm) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_finiteness_are_checked() {
        assert!(Vectors::new(3, vec![0.0; 7]).is_err());
        assert!(Vectors::new(0, vec![]).is_err());
        let err = Vectors::new_finite(2, vec![0.0, 1.0, f32::NAN, 2.0]).unwrap_err();
        assert!(matches!(
            err,
            Error::NonFinite {
                row: 1,
                component: 0,
                ..
            }
        ));
        let v = Vectors::new_finite(2, vec![3.0, 4.0, 0.0, 0.0]).unwrap();
        assert_eq!(v.rows(), 2);
        let mut d = v.into_inner();
        l2_normalize_rows(&mut d, 2);
        assert_eq!(d, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
