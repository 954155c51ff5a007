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

    /// Like [`Vectors::new`], and also rejects NaN and infinities (see [`check_rows`]).
    pub fn new_finite(dim: usize, data: Vec<f32>) -> Result<Self> {
        check_rows(dim, &data)?;
        Ok(Self { dim, data })
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

    pub fn into_inner(self) -> Vec<f32> {
        self.data
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

/// The one check of a row-major block of vectors, shared by every detector and backend: `dim` is
/// not zero, `rows` is a whole number of `dim`-wide rows, and every value is finite (the first
/// offender is named by row and component). Returns the number of rows.
pub fn check_rows(dim: usize, rows: &[f32]) -> Result<usize> {
    if dim == 0 {
        return Err(Error::Malformed("vector width is zero".into()));
    }
    if !rows.len().is_multiple_of(dim) {
        return Err(Error::Malformed(format!(
            "{} values is not a whole number of rows of width {dim}",
            rows.len()
        )));
    }
    // Branch-free scan per block (vectorises); locate the culprit only when there is one.
    let all_finite = rows
        .chunks(1024)
        .all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite()));
    if !all_finite {
        let i = rows.iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(Error::NonFinite {
            row: i / dim,
            component: i % dim,
            value: FloatDisplay(rows[i]),
        });
    }
    Ok(rows.len() / dim)
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
        assert_eq!(check_rows(2, &[0.0; 6]), Ok(3));
        assert!(matches!(
            check_rows(3, &[0.0, 0.0, 0.0, 0.0, f32::INFINITY, 0.0]),
            Err(Error::NonFinite {
                row: 1,
                component: 1,
                ..
            })
        ));
        assert!(check_rows(0, &[]).is_err());
        assert!(check_rows(2, &[0.0; 3]).is_err());
        let v = Vectors::new_finite(2, vec![3.0, 4.0, 0.0, 0.0]).unwrap();
        assert_eq!(v.rows(), 2);
        let mut d = v.into_inner();
        l2_normalize_rows(&mut d, 2);
        assert_eq!(d, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
