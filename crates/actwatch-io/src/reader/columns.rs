//! The columns of a trace file: schema checks, labels as strings, vectors decoded to `f32`.

use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray, GenericListArray, OffsetSizeTrait};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float16Type, Float32Type, Float64Type, Schema};
use arrow::record_batch::RecordBatch;

use super::TraceColumns;
use crate::writer::{dtype_named, VECTOR_DTYPE_KEY};
use crate::{Error, Result};

const LABEL_TYPES: &str =
    "a string (Utf8, LargeUtf8, Utf8View, or dictionary of strings) or integer column";
const VECTOR_TYPES: &str = "FixedSizeList<Float32|Float16|Float64>[d > 0], \
     List<Float32|Float16|Float64>, LargeList<Float32|Float16|Float64>, or FixedSizeBinary[size x d] \
     whose field metadata has actwatch.dtype = float32, float16 or bfloat16 (size 4, 2, 2)";

/// Where the needed columns are in one file's Arrow schema (top-level field indices).
#[derive(Debug, Clone, Copy)]
pub(super) struct FileColumns {
    pub(super) trace: usize,
    pub(super) site: usize,
    pub(super) vector: usize,
    /// The optional [`POSITION_COLUMN`], when the file has one.
    pub(super) position: Option<usize>,
}

/// The column of a trace's token position, read when a file has it (`actwatch capture --pool none`
/// and the server's segments write it): an integer column without nulls.
pub const POSITION_COLUMN: &str = "position";

/// The token positions of a batch's rows: the [`POSITION_COLUMN`] as `i32`; None without one,
/// or when some row of the batch has none (null: the server's segments hold null positions for
/// traces sent without them), so such rows are keyed by their order at their site.
pub(super) fn decode_positions(path: &Path, batch: &RecordBatch) -> Result<Option<Vec<i32>>> {
    let Some(col) = batch.column_by_name(POSITION_COLUMN) else {
        return Ok(None);
    };
    if col.null_count() > 0 {
        return Ok(None);
    }
    let bad = |found: String| Error::BadColumnType {
        path: path.to_path_buf(),
        column: POSITION_COLUMN.to_owned(),
        found,
        expected: "an integer column whose values fit in int32".to_owned(),
    };
    if !col.data_type().is_integer() {
        return Err(bad(col.data_type().to_string()));
    }
    let cast = arrow::compute::cast(col, &DataType::Int32)?;
    if cast.null_count() > 0 {
        // a value out of int32's range became null
        return Err(bad(format!(
            "{} with values outside int32",
            col.data_type()
        )));
    }
    Ok(Some(
        cast.as_primitive::<arrow::datatypes::Int32Type>()
            .values()
            .to_vec(),
    ))
}

/// Column `name` of `batch` (read from `p`).
pub(super) fn column(p: &Path, batch: &RecordBatch, name: &str) -> Result<ArrayRef> {
    batch
        .column_by_name(name)
        .cloned()
        .ok_or_else(|| missing_column(p, batch.schema_ref(), name))
}

pub(super) fn missing_column(path: &Path, schema: &Schema, name: &str) -> Error {
    Error::MissingColumn {
        path: path.to_path_buf(),
        column: name.to_owned(),
        available: schema.fields().iter().map(|f| f.name().clone()).collect(),
    }
}

fn is_label_type(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => true,
        DataType::Dictionary(_, v) => !matches!(**v, DataType::Dictionary(..)) && is_label_type(v),
        _ => false,
    }
}

fn is_float(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Float16 | DataType::Float32 | DataType::Float64
    )
}

fn is_vector_type(dt: &DataType) -> bool {
    match dt {
        DataType::FixedSizeList(f, n) => *n > 0 && is_float(f.data_type()),
        DataType::List(f) | DataType::LargeList(f) => is_float(f.data_type()),
        _ => false,
    }
}

/// The type of a column of raw vector rows, one `FixedSizeBinary(size x d)` per vector marked
/// with its type ([`crate::writer::row_field`]); None for any other column.
fn row_dtype(f: &Field) -> Option<actwatch_core::Dtype> {
    let dtype = dtype_named(f.metadata().get(VECTOR_DTYPE_KEY)?)?;
    match f.data_type() {
        DataType::FixedSizeBinary(n) if *n > 0 && (*n as usize).is_multiple_of(dtype.size()) => {
            Some(dtype)
        }
        _ => None,
    }
}

fn is_vector_field(f: &Field) -> bool {
    is_vector_type(f.data_type()) || row_dtype(f).is_some()
}

pub(super) fn check_schema(
    path: &Path,
    schema: &Schema,
    cols: &TraceColumns,
) -> Result<FileColumns> {
    let find = |name: &str, ok: fn(&Field) -> bool, expected: &str| -> Result<usize> {
        let i = schema
            .index_of(name)
            .map_err(|_| missing_column(path, schema, name))?;
        let dt = schema.field(i).data_type();
        if !ok(schema.field(i)) {
            return Err(Error::BadColumnType {
                path: path.to_path_buf(),
                column: name.to_owned(),
                found: dt.to_string(),
                expected: expected.to_owned(),
            });
        }
        Ok(i)
    };
    Ok(FileColumns {
        trace: find(&cols.trace, |f| is_label_type(f.data_type()), LABEL_TYPES)?,
        site: find(&cols.site, |f| is_label_type(f.data_type()), LABEL_TYPES)?,
        vector: find(&cols.vector, is_vector_field, VECTOR_TYPES)?,
        position: match schema.index_of(POSITION_COLUMN) {
            Ok(i) if schema.field(i).data_type().is_integer() => Some(i),
            Ok(i) => {
                return Err(Error::BadColumnType {
                    path: path.to_path_buf(),
                    column: POSITION_COLUMN.to_owned(),
                    found: schema.field(i).data_type().to_string(),
                    expected: "an integer column".to_owned(),
                })
            }
            Err(_) => None,
        },
    })
}

/// A string or integer column as `Utf8` (integers in decimal).
pub(super) fn label_strings(path: &Path, name: &str, col: &ArrayRef) -> Result<ArrayRef> {
    let dt = col.data_type();
    if !is_label_type(dt) {
        return Err(Error::BadColumnType {
            path: path.to_path_buf(),
            column: name.to_owned(),
            found: dt.to_string(),
            expected: LABEL_TYPES.to_owned(),
        });
    }
    if *dt == DataType::Utf8 {
        return Ok(col.clone());
    }
    Ok(cast(col, &DataType::Utf8)?)
}

pub(super) fn check_no_nulls(
    path: &Path,
    name: &str,
    col: &dyn Array,
    file_row: impl Fn(usize) -> u64,
) -> Result<()> {
    if let Some(nulls) = col.logical_nulls() {
        if let Some(i) = (0..col.len()).find(|&i| nulls.is_null(i)) {
            return Err(Error::NullValue {
                path: path.to_path_buf(),
                column: name.to_owned(),
                row: file_row(i),
            });
        }
    }
    Ok(())
}

fn list_offsets<O: OffsetSizeTrait>(list: &GenericListArray<O>) -> Vec<usize> {
    list.value_offsets().iter().map(|o| o.as_usize()).collect()
}

/// Decodes a vector column (its schema field `field`) into row-after-row `f32` and `rows + 1`
/// offsets starting at 0.
pub(super) fn decode_vectors(
    path: &Path,
    field: &Field,
    col: &ArrayRef,
    file_row: impl Fn(usize) -> u64,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let name = field.name();
    let n = col.len();
    if let Some(dtype) = row_dtype(field) {
        check_no_nulls(path, name, col.as_ref(), &file_row)?;
        let rows = col.as_fixed_size_binary();
        let len = rows.value_length() as usize;
        let width = len / dtype.size();
        // The rows are contiguous (a slice's data starts at its first row): one pass.
        let bytes = &rows.value_data()[..n * len];
        let mut out = Vec::with_capacity(n * width);
        actwatch_core::decode_le(bytes, dtype, &mut out).map_err(|e| Error::BadColumnType {
            path: path.to_path_buf(),
            column: name.to_owned(),
            found: e.to_string(),
            expected: VECTOR_TYPES.to_owned(),
        })?;
        return Ok((out, (0..=n).map(|i| i * width).collect()));
    }
    // Absolute offsets of each row's first value in the child array.
    let (values, abs): (&ArrayRef, Vec<usize>) = match col.data_type() {
        DataType::FixedSizeList(_, _) if is_vector_type(col.data_type()) => {
            let list = col.as_fixed_size_list();
            let abs = (0..=n).map(|i| list.value_offset_at(i)).collect();
            (list.values(), abs)
        }
        DataType::List(_) if is_vector_type(col.data_type()) => {
            let list = col.as_list::<i32>();
            (list.values(), list_offsets(list))
        }
        DataType::LargeList(_) if is_vector_type(col.data_type()) => {
            let list = col.as_list::<i64>();
            (list.values(), list_offsets(list))
        }
        other => {
            return Err(Error::BadColumnType {
                path: path.to_path_buf(),
                column: name.to_owned(),
                found: other.to_string(),
                expected: VECTOR_TYPES.to_owned(),
            })
        }
    };
    check_no_nulls(path, name, col.as_ref(), &file_row)?;
    let (start, end) = (abs[0], abs[n]);
    if let Some(i) = (0..n).find(|&i| abs[i + 1] == abs[i]) {
        return Err(Error::EmptyVector {
            path: path.to_path_buf(),
            column: name.to_owned(),
            row: file_row(i),
        });
    }
    if let Some(nulls) = values.logical_nulls() {
        if nulls.null_count() > 0 {
            if let Some(j) = (start..end).find(|&j| nulls.is_null(j)) {
                let row = abs.partition_point(|&o| o <= j) - 1;
                return Err(Error::NullValue {
                    path: path.to_path_buf(),
                    column: name.to_owned(),
                    row: file_row(row),
                });
            }
        }
    }
    let mut out = Vec::with_capacity(end - start);
    match values.data_type() {
        // Fast path: one copy of the contiguous values.
        DataType::Float32 => {
            out.extend_from_slice(&values.as_primitive::<Float32Type>().values()[start..end])
        }
        DataType::Float16 => out.extend(
            values.as_primitive::<Float16Type>().values()[start..end]
                .iter()
                .map(|x| x.to_f32()),
        ),
        DataType::Float64 => out.extend(
            values.as_primitive::<Float64Type>().values()[start..end]
                .iter()
                .map(|&x| x as f32),
        ),
        _ => unreachable!("checked by is_vector_type"),
    }
    let offsets = abs.iter().map(|o| o - start).collect();
    Ok((out, offsets))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn label_and_vector_types() {
        assert!(is_label_type(&DataType::Utf8View));
        assert!(is_label_type(&DataType::UInt16));
        assert!(is_label_type(&DataType::Dictionary(
            Box::new(DataType::Int32),
            Box::new(DataType::Utf8)
        )));
        assert!(!is_label_type(&DataType::Float32));
        let f = |dt| Arc::new(arrow::datatypes::Field::new("item", dt, true));
        assert!(is_vector_type(&DataType::FixedSizeList(
            f(DataType::Float16),
            4
        )));
        assert!(!is_vector_type(&DataType::FixedSizeList(
            f(DataType::Float32),
            0
        )));
        assert!(is_vector_type(&DataType::LargeList(f(DataType::Float64))));
        assert!(!is_vector_type(&DataType::List(f(DataType::Int32))));
        // Binary rows are vectors only when marked with their type, and a whole number of it.
        for dtype in [
            actwatch_core::Dtype::F32,
            actwatch_core::Dtype::F16,
            actwatch_core::Dtype::Bf16,
        ] {
            let rows = crate::writer::row_field("v", 3, dtype);
            assert_eq!(row_dtype(&rows), Some(dtype));
        }
        let unmarked = arrow::datatypes::Field::new("v", DataType::FixedSizeBinary(8), false);
        assert!(!is_vector_field(&unmarked));
        let odd = arrow::datatypes::Field::new("v", DataType::FixedSizeBinary(6), false)
            .with_metadata(std::collections::HashMap::from([(
                VECTOR_DTYPE_KEY.to_string(),
                "float32".to_string(),
            )]));
        assert!(!is_vector_field(&odd));
        let unknown = arrow::datatypes::Field::new("v", DataType::FixedSizeBinary(8), false)
            .with_metadata(std::collections::HashMap::from([(
                VECTOR_DTYPE_KEY.to_string(),
                "int8".to_string(),
            )]));
        assert!(!is_vector_field(&unknown));
    }
}
