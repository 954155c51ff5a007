//! Streaming trace reader over Parquet files in the long format (the writers are in
//! [`crate::writer`]).
//!
//! One row is one trace: a computation id, a site (a string or an integer layer) and a vector
//! (`FixedSizeList` or `List` of `Float32`, `Float16` or `Float64`). Files are read batch by batch,
//! never whole; vectors are converted to contiguous `f32` once, checked for nulls and non-finite
//! values, and each site's width is held constant across the whole stream.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::{SiteBatch, Vectors};
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, GenericListArray, OffsetSizeTrait};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Float16Type, Float32Type, Float64Type, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;

use crate::{Error, Result};

/// Default name of the computation-id column.
pub const DEFAULT_TRACE_COLUMN: &str = "trace_id";
/// Default name of the site column.
pub const DEFAULT_SITE_COLUMN: &str = "site";
/// Default name of the vector column.
pub const DEFAULT_VECTOR_COLUMN: &str = "activation";
/// Default number of rows per decoded batch.
pub const DEFAULT_BATCH_ROWS: usize = 8192;

const LABEL_TYPES: &str =
    "a string (Utf8, LargeUtf8, Utf8View, or dictionary of strings) or integer column";
const VECTOR_TYPES: &str = "FixedSizeList<Float32|Float16|Float64>[d > 0], \
     List<Float32|Float16|Float64> or LargeList<Float32|Float16|Float64>";

/// Names of the columns a trace is read from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceColumns {
    /// Computation id (string or integer).
    pub trace: String,
    /// Site (string, or integer layer number).
    pub site: String,
    /// Activation vector.
    pub vector: String,
}

impl TraceColumns {
    pub fn new(
        trace: impl Into<String>,
        site: impl Into<String>,
        vector: impl Into<String>,
    ) -> Self {
        Self {
            trace: trace.into(),
            site: site.into(),
            vector: vector.into(),
        }
    }
}

impl Default for TraceColumns {
    fn default() -> Self {
        Self::new(
            DEFAULT_TRACE_COLUMN,
            DEFAULT_SITE_COLUMN,
            DEFAULT_VECTOR_COLUMN,
        )
    }
}

/// How to read traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    pub columns: TraceColumns,
    /// Rows per decoded batch (at most); 0 is treated as 1.
    pub batch_rows: usize,
    /// Keep only rows of these sites; `None` keeps all.
    pub sites: Option<Vec<String>>,
    /// Carry every column but the vector column through in [`TraceBatch::other`].
    pub keep_other_columns: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            columns: TraceColumns::default(),
            batch_rows: DEFAULT_BATCH_ROWS,
            sites: None,
            keep_other_columns: false,
        }
    }
}

/// Expands files and directories into a list of files: a directory contributes every `*.parquet`
/// file below it (recursively, sorted by path, skipping names that start with `.` or `_`); a file
/// named explicitly is taken whatever its extension. Duplicates are dropped (first one kept).
/// Fails with [`Error::Io`] on a missing path and [`Error::NoInput`] when nothing is found.
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for p in paths {
        let md = fs::metadata(p).map_err(|e| Error::io(p, e))?;
        let mut found = Vec::new();
        if md.is_dir() {
            walk_parquet(p, &mut found)?;
            found.sort();
        } else {
            found.push(p.clone());
        }
        for f in found {
            if seen.insert(f.clone()) {
                out.push(f);
            }
        }
    }
    if out.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::NoInput(format!(
            "no .parquet files found under [{}]",
            names.join(", ")
        )));
    }
    Ok(out)
}

fn walk_parquet(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if ft.is_dir() {
            walk_parquet(&path, out)?;
        } else if has_parquet_extension(&path) {
            // Symbolic links are followed to files only (never to directories: no cycles).
            let is_file = ft.is_file()
                || (ft.is_symlink() && fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false));
            if is_file {
                out.push(path);
            }
        }
    }
    Ok(())
}

fn has_parquet_extension(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

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
    /// All vectors, row after row.
    pub vectors: Vec<f32>,
    /// `rows + 1` offsets into `vectors`.
    pub offsets: Vec<usize>,
    /// With [`ReadOptions::keep_other_columns`]: the input's columns except the vector column,
    /// row-aligned with this batch.
    pub other: Option<RecordBatch>,
}

impl TraceBatch {
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
                Ok((rows, SiteBatch::new(&*site, ids, None, vectors)?))
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

/// Where the needed columns are in one file's Arrow schema (top-level field indices).
#[derive(Debug, Clone, Copy)]
struct FileColumns {
    trace: usize,
    site: usize,
    vector: usize,
}

#[derive(Debug)]
struct InputFile {
    path: Arc<PathBuf>,
    meta: ArrowReaderMetadata,
    columns: FileColumns,
}

struct Current {
    path: Arc<PathBuf>,
    reader: ParquetRecordBatchReader,
    next_row: u64,
}

/// Streaming reader over many Parquet files: one file after another, batch by batch (at most
/// [`ReadOptions::batch_rows`] rows each), reading only the needed columns unless
/// [`ReadOptions::keep_other_columns`]. Every file's footer and schema are checked when the
/// reader is opened, so a missing column or corrupt footer fails before any work is done.
///
/// After the first error the iterator ends.
pub struct TraceReader {
    files: Vec<PathBuf>,
    inputs: Vec<InputFile>,
    opts: ReadOptions,
    site_filter: Option<HashSet<String>>,
    next_file: usize,
    current: Option<Current>,
    interned: HashSet<Arc<str>>,
    site_widths: HashMap<Arc<str>, usize>,
    total_rows: u64,
    rows_read: u64,
    done: bool,
}

impl std::fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceReader")
            .field("files", &self.files)
            .field("opts", &self.opts)
            .field("next_file", &self.next_file)
            .field("total_rows", &self.total_rows)
            .field("rows_read", &self.rows_read)
            .finish_non_exhaustive()
    }
}

impl TraceReader {
    /// Expands `paths` (see [`expand_inputs`]), reads every file's footer and checks its schema.
    pub fn open(paths: &[PathBuf], opts: ReadOptions) -> Result<Self> {
        let files = expand_inputs(paths)?;
        let mut inputs = Vec::with_capacity(files.len());
        let mut total_rows = 0u64;
        for path in &files {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
                .map_err(|e| Error::parquet(path, e))?;
            let columns = check_schema(path, meta.schema(), &opts.columns)?;
            total_rows += u64::try_from(meta.metadata().file_metadata().num_rows()).unwrap_or(0);
            inputs.push(InputFile {
                path: Arc::new(path.clone()),
                meta,
                columns,
            });
        }
        let site_filter = opts
            .sites
            .as_ref()
            .map(|s| s.iter().cloned().collect::<HashSet<_>>());
        Ok(Self {
            files,
            inputs,
            opts,
            site_filter,
            next_file: 0,
            current: None,
            interned: HashSet::new(),
            site_widths: HashMap::new(),
            total_rows,
            rows_read: 0,
            done: false,
        })
    }

    /// Rows in all files, from the Parquet footers (before any site filter).
    pub fn total_rows(&self) -> u64 {
        self.total_rows
    }

    /// Rows consumed from the files so far (before any site filter), for progress reporting.
    pub fn rows_read(&self) -> u64 {
        self.rows_read
    }

    /// The files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The vector width of `site`, once a row of it has been read.
    pub fn site_width(&self, site: &str) -> Option<usize> {
        self.site_widths.get(site).copied()
    }

    /// Every site seen so far, with its width, sorted by site.
    pub fn site_widths(&self) -> Vec<(Arc<str>, usize)> {
        let mut v: Vec<_> = self
            .site_widths
            .iter()
            .map(|(s, w)| (s.clone(), *w))
            .collect();
        v.sort();
        v
    }

    fn open_file(&self, index: usize) -> Result<Current> {
        let input = &self.inputs[index];
        let path = input.path.as_path();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, input.meta.clone())
                .with_batch_size(self.opts.batch_rows.max(1));
        if !self.opts.keep_other_columns {
            let c = input.columns;
            let mask =
                ProjectionMask::roots(input.meta.parquet_schema(), [c.trace, c.site, c.vector]);
            builder = builder.with_projection(mask);
        }
        let reader = builder.build().map_err(|e| Error::parquet(path, e))?;
        Ok(Current {
            path: input.path.clone(),
            reader,
            next_row: 0,
        })
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.interned.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.interned.insert(a.clone());
        a
    }

    /// Decodes one Parquet batch; `None` when the site filter dropped every row.
    fn decode(
        &mut self,
        path: &Arc<PathBuf>,
        batch: RecordBatch,
        first_row: u64,
    ) -> Result<Option<TraceBatch>> {
        let cols = self.opts.columns.clone();
        let p = path.as_path();
        let column = |batch: &RecordBatch, name: &str| -> Result<ArrayRef> {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| missing_column(p, batch.schema_ref(), name))
        };

        // Sites first, so that a site filter drops rows before anything else is decoded.
        let site_col = label_strings(p, &cols.site, &column(&batch, &cols.site)?)?;
        let site_str = site_col.as_string::<i32>();
        check_no_nulls(p, &cols.site, &site_col, |i| first_row + i as u64)?;
        let mut sites = Vec::with_capacity(site_str.len());
        let mut last: Option<Arc<str>> = None;
        for s in site_str.iter() {
            let s = s.unwrap_or_default();
            let a = match &last {
                Some(a) if &**a == s => a.clone(),
                _ => self.intern(s),
            };
            last = Some(a.clone());
            sites.push(a);
        }

        let (batch, file_rows) = match &self.site_filter {
            None => (batch, None),
            Some(keep) => {
                let mask: BooleanArray = sites.iter().map(|s| Some(keep.contains(&**s))).collect();
                let kept = mask.true_count();
                if kept == 0 {
                    return Ok(None);
                }
                if kept == sites.len() {
                    (batch, None)
                } else {
                    let rows: Vec<u64> = (0..sites.len())
                        .filter(|&i| mask.value(i))
                        .map(|i| first_row + i as u64)
                        .collect();
                    let mut i = 0;
                    sites.retain(|_| {
                        i += 1;
                        mask.value(i - 1)
                    });
                    (filter_record_batch(&batch, &mask)?, Some(rows))
                }
            }
        };
        let file_row = |i: usize| -> u64 {
            match &file_rows {
                Some(rows) => rows[i],
                None => first_row + i as u64,
            }
        };

        let id_col = label_strings(p, &cols.trace, &column(&batch, &cols.trace)?)?;
        check_no_nulls(p, &cols.trace, &id_col, file_row)?;
        let trace_ids: Vec<String> = id_col
            .as_string::<i32>()
            .iter()
            .map(|s| s.unwrap_or_default().to_owned())
            .collect();

        let vec_col = column(&batch, &cols.vector)?;
        let (vectors, offsets) = decode_vectors(p, &cols.vector, &vec_col, file_row)?;
        self.check_widths(p, &sites, &offsets, file_row)?;
        if let Some(pos) = vectors.iter().position(|x| !x.is_finite()) {
            let row = offsets.partition_point(|&o| o <= pos) - 1;
            return Err(Error::NonFinite {
                path: p.to_path_buf(),
                row: file_row(row),
                component: pos - offsets[row],
            });
        }

        let other = if self.opts.keep_other_columns {
            let schema = batch.schema();
            let keep: Vec<usize> = (0..schema.fields().len())
                .filter(|&i| schema.field(i).name() != &cols.vector)
                .collect();
            Some(batch.project(&keep)?)
        } else {
            None
        };

        Ok(Some(TraceBatch {
            path: path.clone(),
            first_row,
            file_rows,
            trace_ids,
            sites,
            vectors,
            offsets,
            other,
        }))
    }

    fn check_widths(
        &mut self,
        path: &Path,
        sites: &[Arc<str>],
        offsets: &[usize],
        file_row: impl Fn(usize) -> u64,
    ) -> Result<()> {
        let mut last: Option<(&Arc<str>, usize)> = None;
        for (i, site) in sites.iter().enumerate() {
            let w = offsets[i + 1] - offsets[i];
            if let Some((s, lw)) = last {
                if Arc::ptr_eq(s, site) && lw == w {
                    continue;
                }
            }
            match self.site_widths.get(site) {
                Some(&expected) if expected != w => {
                    return Err(Error::WidthMismatch {
                        path: path.to_path_buf(),
                        site: site.to_string(),
                        expected,
                        got: w,
                        row: file_row(i),
                    });
                }
                Some(_) => {}
                None => {
                    self.site_widths.insert(site.clone(), w);
                }
            }
            last = Some((site, w));
        }
        Ok(())
    }

    fn fail(&mut self, e: Error) -> Option<Result<TraceBatch>> {
        self.done = true;
        self.current = None;
        Some(Err(e))
    }
}

impl Iterator for TraceReader {
    type Item = Result<TraceBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if self.current.is_none() {
                if self.next_file >= self.inputs.len() {
                    self.done = true;
                    return None;
                }
                match self.open_file(self.next_file) {
                    Ok(c) => self.current = Some(c),
                    Err(e) => return self.fail(e),
                }
                self.next_file += 1;
            }
            let cur = self.current.as_mut().expect("a file is open");
            let batch = match cur.reader.next() {
                None => {
                    self.current = None;
                    continue;
                }
                Some(Err(e)) => {
                    let e = Error::parquet(cur.path.as_path(), ParquetError::External(Box::new(e)));
                    return self.fail(e);
                }
                Some(Ok(b)) => b,
            };
            let first_row = cur.next_row;
            let n = batch.num_rows() as u64;
            cur.next_row += n;
            let path = cur.path.clone();
            self.rows_read += n;
            if n == 0 {
                continue;
            }
            match self.decode(&path, batch, first_row) {
                Ok(Some(b)) => return Some(Ok(b)),
                Ok(None) => continue,
                Err(e) => return self.fail(e),
            }
        }
    }
}

fn missing_column(path: &Path, schema: &Schema, name: &str) -> Error {
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

fn check_schema(path: &Path, schema: &Schema, cols: &TraceColumns) -> Result<FileColumns> {
    let find = |name: &str, ok: fn(&DataType) -> bool, expected: &str| -> Result<usize> {
        let i = schema
            .index_of(name)
            .map_err(|_| missing_column(path, schema, name))?;
        let dt = schema.field(i).data_type();
        if !ok(dt) {
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
        trace: find(&cols.trace, is_label_type, LABEL_TYPES)?,
        site: find(&cols.site, is_label_type, LABEL_TYPES)?,
        vector: find(&cols.vector, is_vector_type, VECTOR_TYPES)?,
    })
}

/// A string or integer column as `Utf8` (integers in decimal).
fn label_strings(path: &Path, name: &str, col: &ArrayRef) -> Result<ArrayRef> {
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

fn check_no_nulls(
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

/// Decodes a vector column into row-after-row `f32` and `rows + 1` offsets starting at 0.
fn decode_vectors(
    path: &Path,
    name: &str,
    col: &ArrayRef,
    file_row: impl Fn(usize) -> u64,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let n = col.len();
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
            vectors,
            offsets,
            other: None,
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
    }
}
