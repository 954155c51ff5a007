//! The inputs of a capture: token ids (and attention masks) read from Parquet, a window of rows
//! at a time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::capture::InputColumns;
use crate::{Error, Result};

/// One window of decoded input rows.
pub(crate) struct Window {
    pub(crate) ids: Vec<String>,
    /// Per row: token ids and mask (same length, >= 1).
    pub(crate) tokens: Vec<Vec<i64>>,
    pub(crate) masks: Vec<Vec<i64>>,
}

/// Streams windows of rows from one inputs file.
pub(crate) struct InputReader {
    path: PathBuf,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    has_mask: bool,
    columns: InputColumns,
    next_row: u64,
}

impl InputReader {
    pub(crate) fn open(path: &Path, columns: &InputColumns, window: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::input(path, format!("cannot open: {e}")))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::input(path, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let find = |name: &str| schema.fields().iter().position(|f| f.name() == name);
        let id = find(&columns.id).ok_or_else(|| missing(path, &columns.id, &schema))?;
        let input_ids =
            find(&columns.input_ids).ok_or_else(|| missing(path, &columns.input_ids, &schema))?;
        let mask = find(&columns.attention_mask);
        check_label_type(path, &columns.id, schema.field(id).data_type())?;
        check_list_type(
            path,
            &columns.input_ids,
            schema.field(input_ids).data_type(),
        )?;
        if let Some(m) = mask {
            check_list_type(path, &columns.attention_mask, schema.field(m).data_type())?;
        }
        let roots: Vec<usize> = [Some(id), Some(input_ids), mask]
            .into_iter()
            .flatten()
            .collect();
        let projection = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder
            .with_projection(projection)
            .with_batch_size(window)
            .build()
            .map_err(|e| Error::input(path, e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            has_mask: mask.is_some(),
            columns: columns.clone(),
            next_row: 0,
        })
    }

    pub(crate) fn next_window(&mut self) -> Result<Option<(u64, Window)>> {
        let Some(batch) = self.reader.next() else {
            return Ok(None);
        };
        let batch = batch.map_err(|e| Error::input(&self.path, e.to_string()))?;
        let first = self.next_row;
        self.next_row += batch.num_rows() as u64;
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .expect("projected column")
                .clone()
        };
        let path = &self.path;
        let ids_col = cast(&col(&self.columns.id), &DataType::Utf8)
            .map_err(|e| Error::input(path, format!("column {:?}: {e}", self.columns.id)))?;
        let ids_col = ids_col.as_string::<i32>();
        let tokens = int_lists(
            path,
            &self.columns.input_ids,
            &col(&self.columns.input_ids),
            first,
        )?;
        let masks = if self.has_mask {
            let m = int_lists(
                path,
                &self.columns.attention_mask,
                &col(&self.columns.attention_mask),
                first,
            )?;
            self.check_masks(&tokens, &m, first)?;
            m
        } else {
            tokens.iter().map(|t| vec![1i64; t.len()]).collect()
        };
        let mut ids = Vec::with_capacity(batch.num_rows());
        for i in 0..ids_col.len() {
            if ids_col.is_null(i) {
                return Err(Error::input(
                    path,
                    format!(
                        "row {}: null in column {:?}",
                        first + i as u64,
                        self.columns.id
                    ),
                ));
            }
            ids.push(ids_col.value(i).to_string());
        }
        Ok(Some((first, Window { ids, tokens, masks })))
    }
}

impl InputReader {
    /// Each mask is as long as its tokens, holds only 0 and 1, and keeps at least one token.
    fn check_masks(&self, tokens: &[Vec<i64>], masks: &[Vec<i64>], first: u64) -> Result<()> {
        let (path, ids, mask) = (
            &self.path,
            &self.columns.input_ids,
            &self.columns.attention_mask,
        );
        for (i, (t, m)) in tokens.iter().zip(masks).enumerate() {
            let row = first + i as u64;
            let why = if t.len() != m.len() {
                format!(
                    "{ids:?} has {} values but {mask:?} has {} (ragged)",
                    t.len(),
                    m.len()
                )
            } else if m.iter().any(|&v| v != 0 && v != 1) {
                format!("{mask:?} holds a value other than 0 and 1")
            } else if !m.contains(&1) {
                format!("{mask:?} masks every token")
            } else {
                continue;
            };
            return Err(Error::input(path, format!("row {row}: {why}")));
        }
        Ok(())
    }
}

fn missing(path: &Path, name: &str, schema: &SchemaRef) -> Error {
    let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    Error::input(
        path,
        format!("no column {name:?} (columns: {})", have.join(", ")),
    )
}

fn check_label_type(path: &Path, name: &str, dt: &DataType) -> Result<()> {
    if matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) || dt.is_integer()
    {
        Ok(())
    } else {
        Err(Error::input(
            path,
            format!("column {name:?} is {dt}, expected a string or integer column"),
        ))
    }
}

fn check_list_type(path: &Path, name: &str, dt: &DataType) -> Result<()> {
    match dt {
        DataType::List(f) | DataType::LargeList(f) if f.data_type().is_integer() => Ok(()),
        _ => Err(Error::input(
            path,
            format!("column {name:?} is {dt}, expected a list of integers (list<int64>)"),
        )),
    }
}

/// A list-of-integers column as one `Vec<i64>` per row (no nulls, no empty rows).
fn int_lists(path: &Path, name: &str, col: &ArrayRef, first: u64) -> Result<Vec<Vec<i64>>> {
    let target = DataType::LargeList(Arc::new(Field::new("item", DataType::Int64, true)));
    let col =
        cast(col, &target).map_err(|e| Error::input(path, format!("column {name:?}: {e}")))?;
    let list = col.as_list::<i64>();
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        let row = first + i as u64;
        if list.is_null(i) {
            return Err(Error::input(
                path,
                format!("row {row}: null in column {name:?}"),
            ));
        }
        let values = list.value(i);
        let values = values.as_primitive::<Int64Type>();
        if values.null_count() > 0 {
            return Err(Error::input(
                path,
                format!("row {row}: null inside column {name:?}"),
            ));
        }
        if values.is_empty() {
            return Err(Error::input(
                path,
                format!("row {row}: empty sequence in column {name:?}"),
            ));
        }
        out.push(values.values().to_vec());
    }
    Ok(out)
}
