//! [`TraceBatch`]: one decoded batch of traces from one file, and its per-site views.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use actwatch_core::{Provenance, SiteBatch, Vectors};
use arrow::record_batch::RecordBatch;

use crate::provenance::FileProvenance;
use crate::{Error, Result};

/// One decoded batch of traces, all from one file.
///
/// Row `i` has id `trace_ids[i]`, site `sites[i]` and vector
/// `vectors[offsets[i]..offsets[i + 1]]`; different sites may have different widths, one site
/// always has the same width. Use [`TraceBatch::site_batches`] to get one [`SiteBatch`] per site.
#[derive(Debug, Clone)]
pub struct TraceBatch {
    /// The file the batch came from.
    pub path: Arc<PathBuf>,
    /// Row index, within its file, of the first row of the Parquet batch this came from.
    pub first_row: u64,
    /// File row index of every row, when a site filter dropped rows; `None` means row `i` is
    /// file row `first_row + i`.
    pub file_rows: Option<Vec<u64>>,
    pub trace_ids: Vec<String>,
    /// Interned: one `Arc` per distinct site over the whole stream.
    pub sites: Vec<Arc<str>>,
    /// Token positions (the file's `position` column), when it has one.
    pub positions: Option<Vec<i32>>,
    /// All vectors, row after row.
    pub vectors: Vec<f32>,
    /// `rows + 1` offsets into `vectors`.
    pub offsets: Vec<usize>,
    /// With [`ReadOptions::keep_other_columns`]: the input's columns except the vector column,
    /// row-aligned with this batch.
    pub other: Option<RecordBatch>,
    /// What the file's metadata says produced its traces ([`crate::provenance`]).
    pub provenance: Option<Arc<FileProvenance>>,
}

impl TraceBatch {
    /// The label of every row from column `column` of [`TraceBatch::other`] (read with
    /// [`crate::reader::ReadOptions::keep_other_columns`]): a boolean, or an integer 0 or 1.
    /// A missing column, another type, a null or another value is an error naming file and row.
    pub fn labels(&self, column: &str) -> Result<Vec<bool>> {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{
            DataType, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
            UInt64Type, UInt8Type,
        };
        let path = self.path.as_ref().clone();
        let other = self.other.as_ref().ok_or_else(|| Error::MissingColumn {
            path: path.clone(),
            column: column.to_string(),
            available: Vec::new(),
        })?;
        let Some(col) = other.column_by_name(column) else {
            return Err(Error::MissingColumn {
                path,
                column: column.to_string(),
                available: other
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect(),
            });
        };
        if let Some(i) = (0..col.len()).find(|&i| col.is_null(i)) {
            return Err(Error::NullValue {
                path,
                column: column.to_string(),
                row: self.file_row(i),
            });
        }
        let ints: Vec<i128> = match col.data_type() {
            DataType::Boolean => {
                return Ok(col.as_boolean().iter().map(|v| v == Some(true)).collect())
            }
            DataType::Int8 => col
                .as_primitive::<Int8Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::Int16 => col
                .as_primitive::<Int16Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::Int32 => col
                .as_primitive::<Int32Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::Int64 => col
                .as_primitive::<Int64Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::UInt8 => col
                .as_primitive::<UInt8Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::UInt16 => col
                .as_primitive::<UInt16Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::UInt32 => col
                .as_primitive::<UInt32Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            DataType::UInt64 => col
                .as_primitive::<UInt64Type>()
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect(),
            other => {
                return Err(Error::BadColumnType {
                    path,
                    column: column.to_string(),
                    found: other.to_string(),
                    expected: "a label: boolean, or an integer 0 or 1".into(),
                })
            }
        };
        ints.iter()
            .enumerate()
            .map(|(i, &v)| match v {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(Error::BadValue {
                    path: path.clone(),
                    column: column.to_string(),
                    row: self.file_row(i),
                    message: format!("label {v} is not 0 or 1"),
                }),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.trace_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trace_ids.is_empty()
    }

    /// The vector of row `i`.
    pub fn row_vector(&self, i: usize) -> &[f32] {
        &self.vectors[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The width of row `i`'s vector.
    pub fn width(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// The row index within its file of row `i`.
    pub fn file_row(&self, i: usize) -> u64 {
        match &self.file_rows {
            Some(rows) => rows[i],
            None => self.first_row + i as u64,
        }
    }

    /// What produced the traces of `site`, when the file says.
    pub fn provenance(&self, site: &str) -> Option<&Arc<Provenance>> {
        self.provenance.as_ref().and_then(|p| p.site(site))
    }

    /// A provenance conflict about this batch's traces, as an error naming its file.
    pub(crate) fn provenance_error(&self, e: actwatch_detect::Error) -> Error {
        Error::Metadata {
            path: self.path.to_path_buf(),
            key: crate::provenance::PROVENANCE_KEY,
            message: e.to_string(),
        }
    }

    /// The distinct sites of the batch in order of first appearance, each with its row indices.
    pub fn site_groups(&self) -> Vec<(Arc<str>, Vec<usize>)> {
        let mut groups: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        let mut last: Option<(Arc<str>, usize)> = None;
        for (i, site) in self.sites.iter().enumerate() {
            let g = match &last {
                Some((s, g)) if Arc::ptr_eq(s, site) => *g,
                _ => {
                    let g = *index.entry(site.clone()).or_insert_with(|| {
                        groups.push((site.clone(), Vec::new()));
                        groups.len() - 1
                    });
                    last = Some((site.clone(), g));
                    g
                }
            };
            groups[g].1.push(i);
        }
        groups
    }

    /// The vectors of `rows` as one block. Fails if `rows` is empty or the rows differ in width.
    pub fn gather(&self, rows: &[usize]) -> Result<Vectors> {
        let Some(&first) = rows.first() else {
            return Err(actwatch_core::Error::Empty("no rows to gather".into()).into());
        };
        let dim = self.width(first);
        // The common case (a site's rows are contiguous, e.g. one site per batch) is one copy.
        let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
        let data = if contiguous {
            let end = rows[rows.len() - 1] + 1;
            if self.offsets[end] - self.offsets[first] != dim * rows.len() {
                return Err(width_error(self, rows, dim));
            }
            self.vectors[self.offsets[first]..self.offsets[end]].to_vec()
        } else {
            let mut data = Vec::with_capacity(dim * rows.len());
            for &r in rows {
                let v = self.row_vector(r);
                if v.len() != dim {
                    return Err(width_error(self, rows, dim));
                }
                data.extend_from_slice(v);
            }
            data
        };
        Ok(Vectors::new(dim, data)?)
    }

    /// One [`SiteBatch`] per distinct site, in order of first appearance, each with the row
    /// indices (into this batch, ascending) it was gathered from.
    pub fn site_batches(&self) -> Result<Vec<(Vec<usize>, SiteBatch)>> {
        self.site_groups()
            .into_iter()
            .map(|(site, rows)| {
                let vectors = self.gather(&rows)?;
                let ids = rows.iter().map(|&r| self.trace_ids[r].clone()).collect();
                let positions = self
                    .positions
                    .as_ref()
                    .map(|p| rows.iter().map(|&r| p[r]).collect());
                let batch = SiteBatch::new(&*site, ids, positions, vectors)?
                    .with_provenance(self.provenance(&site).cloned());
                Ok((rows, batch))
            })
            .collect()
    }
}

fn width_error(batch: &TraceBatch, rows: &[usize], dim: usize) -> Error {
    let got = rows
        .iter()
        .map(|&r| batch.width(r))
        .find(|&w| w != dim)
        .unwrap_or(dim);
    actwatch_core::Error::WidthMismatch { expected: dim, got }.into()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    fn batch(sites: &[&str], widths: &[usize]) -> TraceBatch {
        let mut offsets = vec![0];
        let mut vectors = Vec::new();
        for (i, &w) in widths.iter().enumerate() {
            vectors.extend((0..w).map(|c| (i * 10 + c) as f32));
            offsets.push(vectors.len());
        }
        let mut interned: HashMap<&str, Arc<str>> = HashMap::new();
        TraceBatch {
            path: Arc::new(PathBuf::from("x.parquet")),
            first_row: 100,
            file_rows: None,
            trace_ids: (0..sites.len()).map(|i| i.to_string()).collect(),
            sites: sites
                .iter()
                .map(|s| interned.entry(s).or_insert_with(|| Arc::from(*s)).clone())
                .collect(),
            positions: None,
            vectors,
            offsets,
            other: None,
            provenance: None,
        }
    }

    #[test]
    fn groups_and_gathers_by_site() {
        let b = batch(&["a", "b", "a", "a", "b"], &[2, 3, 2, 2, 3]);
        let groups = b.site_batches().unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].1.site(), "a");
        assert_eq!(groups[0].0, vec![0, 2, 3]);
        assert_eq!(groups[0].1.trace_ids(), ["0", "2", "3"]);
        assert_eq!(groups[0].1.dim(), 2);
        assert_eq!(
            groups[0].1.vectors().as_slice(),
            &[0., 1., 20., 21., 30., 31.]
        );
        assert_eq!(groups[1].0, vec![1, 4]);
        assert_eq!(groups[1].1.vectors().row(1), &[40., 41., 42.]);
        assert_eq!(b.file_row(3), 103);
        // Contiguous gather, and mixed widths refused.
        assert_eq!(b.gather(&[2, 3]).unwrap().as_slice(), &[20., 21., 30., 31.]);
        assert!(b.gather(&[0, 1]).is_err());
        assert!(b.gather(&[3, 4]).is_err());
        assert!(b.gather(&[]).is_err());
    }
}
