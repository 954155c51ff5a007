//! Streaming trace reader over Parquet and Arrow IPC files in the long format (the writers are in
//! [`crate::writer`]; an IPC file is told by its magic bytes, whatever its name: [`ipc`]).
//!
//! One row is one trace: a computation id, a site (a string or an integer layer) and a vector
//! (`FixedSizeList` or `List` of `Float32`, `Float16` or `Float64`, or raw rows marked with their
//! type: [`crate::writer::row_field`]). Files are read batch by batch,
//! never whole; vectors are converted to contiguous `f32` once, checked for nulls and non-finite
//! values, and each site's width is held constant across the whole stream.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;

mod ahead;
mod batch;
mod columns;
mod ipc;

pub use ahead::ReadAhead;
pub use batch::TraceBatch;
pub use columns::POSITION_COLUMN;
use columns::{
    check_no_nulls, check_schema, column, decode_positions, decode_vectors, label_strings,
    FileColumns,
};

use crate::provenance::{FileProvenance, PROVENANCE_KEY};
use crate::{Error, Result};

/// Runs a call into the Parquet decoder, turning a panic into an error naming the file. The
/// decoder (parquet / arrow 60) still panics on some corrupt footers and pages instead of
/// returning an error (the fuzz suite found five: see `docs/fuzzing.md`), and one corrupt input
/// must not take down a fit or the server. Only the decoder's calls are guarded: a panic in
/// actwatch's own code stays a bug.
fn guarded<T>(path: &Path, call: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|panic| {
        Error::parquet(
            path,
            ParquetError::General(format!(
                "the Parquet decoder failed on corrupt data: {}",
                panic_message(&*panic)
            )),
        )
    })
}

/// The message a panic carried, if it was a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Refuses a file whose string dictionary page declares more values than its bytes can hold.
/// The Parquet decoder (parquet 60.1, upstream) reserves a byte-array dictionary's declared
/// value count before decoding it (four bytes an offset, sixteen a view), so a 1.6 kB file that
/// declares 864 million values asked for 3.4 GB at once (the fuzz suite found it). Each value
/// of a plain byte array takes at least its four-byte length, so a page of `n` bytes holds at
/// most `n / 4`. Only the page headers of the file's byte-array columns (of those read) are
/// walked, and only their dictionary pages read, before the decoder sees them.
fn check_dictionary_pages(
    path: &Path,
    file: &File,
    meta: &ArrowReaderMetadata,
    mask: Option<&ProjectionMask>,
) -> Result<()> {
    use parquet::basic::Type as PhysicalType;
    use parquet::column::page::{Page, PageReader};
    use parquet::file::serialized_reader::SerializedPageReader;
    let reader = Arc::new(file.try_clone().map_err(|e| Error::io(path, e))?);
    let check = || -> std::result::Result<(), ParquetError> {
        for rg in meta.metadata().row_groups() {
            let rows = usize::try_from(rg.num_rows()).unwrap_or(0);
            for (leaf, col) in rg.columns().iter().enumerate() {
                if col.column_type() != PhysicalType::BYTE_ARRAY
                    || mask.is_some_and(|m| !m.leaf_included(leaf))
                {
                    continue;
                }
                let mut pages = SerializedPageReader::new(reader.clone(), col, rows, None)?;
                while let Some(page) = pages.peek_next_page()? {
                    if !page.is_dict {
                        pages.skip_next_page()?;
                        continue;
                    }
                    if let Some(Page::DictionaryPage {
                        buf, num_values, ..
                    }) = pages.get_next_page()?
                    {
                        if num_values as usize > buf.len() / 4 {
                            return Err(ParquetError::General(format!(
                                "column {:?}: a dictionary page declares {num_values} values \
                                 in {} bytes (a value takes at least 4)",
                                col.column_path().string(),
                                buf.len()
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    };
    guarded(path, check)?.map_err(|e| Error::parquet(path, e))
}

/// Default name of the computation-id column.
pub const DEFAULT_TRACE_COLUMN: &str = "trace_id";
/// Default name of the site column.
pub const DEFAULT_SITE_COLUMN: &str = "site";
/// Default name of the vector column.
pub const DEFAULT_VECTOR_COLUMN: &str = "activation";
/// Default number of rows per decoded batch.
pub const DEFAULT_BATCH_ROWS: usize = 8192;

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

/// The number of rows a Parquet file's footer records (only the footer is read), or an Arrow IPC
/// file's record batches declare (the footer and each batch's header are read).
pub fn file_rows(path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    if ipc::is_ipc(path, &mut file)? {
        return Ok(ipc::read_layout(path, &mut file)?.rows);
    }
    let meta = guarded(path, || {
        ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
    })?
    .map_err(|e| Error::parquet(path, e))?;
    Ok(u64::try_from(meta.metadata().file_metadata().num_rows()).unwrap_or(0))
}

/// Expands files and directories into a list of files: a directory contributes every `*.parquet`
/// and `*.arrow` (Arrow IPC) file below it (recursively, sorted by path, skipping names that start with `.` or `_`); a file
/// named explicitly is taken whatever its extension. Duplicates are dropped (first one kept).
/// Fails with [`Error::Io`] on a missing path and [`Error::NoInput`] when nothing is found.
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for p in paths {
        let md = fs::metadata(p).map_err(|e| Error::io(p, e))?;
        let mut found = Vec::new();
        if md.is_dir() {
            walk_inputs(p, &mut found)?;
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
            "no .parquet or .arrow files found under [{}]",
            names.join(", ")
        )));
    }
    Ok(out)
}

fn walk_inputs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
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
            walk_inputs(&path, out)?;
        } else if has_input_extension(&path) {
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

fn has_input_extension(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("arrow"))
}

/// What a file is, from its footer.
#[derive(Debug)]
enum Layout {
    Parquet(ArrowReaderMetadata),
    Ipc(Arc<ipc::IpcLayout>),
}

#[derive(Debug)]
struct InputFile {
    path: Arc<PathBuf>,
    layout: Layout,
    columns: FileColumns,
    provenance: Option<Arc<FileProvenance>>,
}

/// The record batches of the file being read.
enum Batches {
    Parquet(ParquetRecordBatchReader),
    Ipc(ipc::IpcBatches),
}

struct Current {
    path: Arc<PathBuf>,
    provenance: Option<Arc<FileProvenance>>,
    reader: Batches,
    next_row: u64,
}

impl Current {
    /// The file's next record batch, `None` at its end.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        let path = self.path.as_path();
        match &mut self.reader {
            Batches::Parquet(reader) => match guarded(path, || reader.next())? {
                None => Ok(None),
                Some(Err(e)) => Err(Error::parquet(path, ParquetError::External(Box::new(e)))),
                Some(Ok(b)) => Ok(Some(b)),
            },
            Batches::Ipc(reader) => reader.next_batch(),
        }
    }
}

/// Streaming reader over many Parquet or Arrow IPC files: one file after another, batch by batch (at most
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
            let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
            let (layout, columns, provenance) = if ipc::is_ipc(path, &mut file)? {
                let layout = ipc::read_layout(path, &mut file)?;
                let columns = check_schema(path, &layout.schema, &opts.columns)?;
                total_rows += layout.rows;
                let provenance = layout.metadata.get(PROVENANCE_KEY).cloned();
                (Layout::Ipc(Arc::new(layout)), columns, provenance)
            } else {
                let meta = guarded(path, || {
                    ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
                })?
                .map_err(|e| Error::parquet(path, e))?;
                let columns = check_schema(path, meta.schema(), &opts.columns)?;
                let file_meta = meta.metadata().file_metadata();
                total_rows += u64::try_from(file_meta.num_rows()).unwrap_or(0);
                let provenance = file_meta
                    .key_value_metadata()
                    .and_then(|kv| kv.iter().find(|e| e.key == PROVENANCE_KEY))
                    .and_then(|e| e.value.clone());
                (Layout::Parquet(meta), columns, provenance)
            };
            let provenance = provenance
                .map(|json| FileProvenance::parse(path, &json).map(Arc::new))
                .transpose()?;
            inputs.push(InputFile {
                path: Arc::new(path.clone()),
                layout,
                columns,
                provenance,
            });
        }
        Ok(Self {
            files,
            inputs,
            total_rows,
            done: false,
            ..Self::for_batches(opts)
        })
    }

    /// A reader without files, to decode record batches handed over in memory with
    /// [`TraceReader::decode_batch`] (the door for in-process callers such as the Python
    /// bindings): the same checks, site filter and per-site widths as for files.
    pub fn for_batches(opts: ReadOptions) -> Self {
        let site_filter = opts
            .sites
            .as_ref()
            .map(|s| s.iter().cloned().collect::<HashSet<_>>());
        Self {
            files: Vec::new(),
            inputs: Vec::new(),
            opts,
            site_filter,
            next_file: 0,
            current: None,
            interned: HashSet::new(),
            site_widths: HashMap::new(),
            total_rows: 0,
            rows_read: 0,
            done: true,
        }
    }

    /// Decodes one record batch of traces held in memory, its schema checked as a file's would
    /// be, `source` naming it in errors and `first_row` numbering its rows; a provenance in the
    /// schema's metadata (as a Parquet footer written by actwatch carries it) is kept. `None`
    /// when the site filter drops every row.
    pub fn decode_batch(
        &mut self,
        source: &Arc<PathBuf>,
        batch: RecordBatch,
        first_row: u64,
    ) -> Result<Option<TraceBatch>> {
        check_schema(source, batch.schema_ref(), &self.opts.columns)?;
        let provenance = batch
            .schema_ref()
            .metadata()
            .get(PROVENANCE_KEY)
            .map(|json| FileProvenance::parse(source, json).map(Arc::new))
            .transpose()?;
        self.rows_read += batch.num_rows() as u64;
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let mut decoded = self.decode(source, batch, first_row)?;
        if let Some(b) = decoded.as_mut() {
            b.provenance = provenance;
        }
        Ok(decoded)
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
        let reader = match &input.layout {
            Layout::Ipc(layout) => Batches::Ipc(ipc::IpcBatches::open(
                input.path.clone(),
                file,
                layout.clone(),
                self.opts.batch_rows,
            )?),
            Layout::Parquet(meta) => {
                let mask = (!self.opts.keep_other_columns).then(|| {
                    let c = input.columns;
                    let roots = [c.trace, c.site, c.vector].into_iter().chain(c.position);
                    ProjectionMask::roots(meta.parquet_schema(), roots)
                });
                check_dictionary_pages(path, &file, meta, mask.as_ref())?;
                let mut builder =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone())
                        .with_batch_size(self.opts.batch_rows.max(1));
                if let Some(mask) = mask {
                    builder = builder.with_projection(mask);
                }
                let reader =
                    guarded(path, || builder.build())?.map_err(|e| Error::parquet(path, e))?;
                Batches::Parquet(reader)
            }
        };
        Ok(Current {
            path: input.path.clone(),
            provenance: input.provenance.clone(),
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
        // Sites first, so that a site filter drops rows before anything else is decoded.
        let mut sites = self.decode_sites(p, &batch, first_row)?;
        let Some((batch, file_rows)) = self.filter_sites(batch, &mut sites, first_row)? else {
            return Ok(None);
        };
        let file_row = |i: usize| -> u64 {
            match &file_rows {
                Some(rows) => rows[i],
                None => first_row + i as u64,
            }
        };

        let id_col = label_strings(p, &cols.trace, &column(p, &batch, &cols.trace)?)?;
        check_no_nulls(p, &cols.trace, &id_col, file_row)?;
        let trace_ids: Vec<String> = id_col
            .as_string::<i32>()
            .iter()
            .map(|s| s.unwrap_or_default().to_owned())
            .collect();

        let positions = decode_positions(p, &batch)?;
        let vec_col = column(p, &batch, &cols.vector)?;
        let schema = batch.schema();
        let vec_field = schema
            .field_with_name(&cols.vector)
            .map_err(|_| columns::missing_column(p, &schema, &cols.vector))?;
        let (vectors, offsets) = decode_vectors(p, vec_field, &vec_col, file_row)?;
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
            positions,
            vectors,
            offsets,
            other,
            provenance: None,
        }))
    }

    /// The site of every row, interned (one `Arc` per distinct site over the whole stream).
    fn decode_sites(
        &mut self,
        p: &Path,
        batch: &RecordBatch,
        first_row: u64,
    ) -> Result<Vec<Arc<str>>> {
        let name = self.opts.columns.site.clone();
        let site_col = label_strings(p, &name, &column(p, batch, &name)?)?;
        check_no_nulls(p, &name, &site_col, |i| first_row + i as u64)?;
        let site_str = site_col.as_string::<i32>();
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
        Ok(sites)
    }

    /// Applies the site filter to `batch` and `sites`: `None` when it drops every row, else the
    /// kept rows and, when some were dropped, the file row index of each kept row.
    fn filter_sites(
        &self,
        batch: RecordBatch,
        sites: &mut Vec<Arc<str>>,
        first_row: u64,
    ) -> Result<Option<(RecordBatch, Option<Vec<u64>>)>> {
        let Some(keep) = &self.site_filter else {
            return Ok(Some((batch, None)));
        };
        let mask: BooleanArray = sites.iter().map(|s| Some(keep.contains(&**s))).collect();
        let kept = mask.true_count();
        if kept == 0 {
            return Ok(None);
        }
        if kept == sites.len() {
            return Ok(Some((batch, None)));
        }
        let rows: Vec<u64> = (0..sites.len())
            .filter(|&i| mask.value(i))
            .map(|i| first_row + i as u64)
            .collect();
        let mut i = 0;
        sites.retain(|_| {
            i += 1;
            mask.value(i - 1)
        });
        Ok(Some((filter_record_batch(&batch, &mask)?, Some(rows))))
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
            let batch = match cur.next_batch() {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.current = None;
                    continue;
                }
                Err(e) => return self.fail(e),
            };
            let first_row = cur.next_row;
            let n = batch.num_rows() as u64;
            cur.next_row += n;
            let path = cur.path.clone();
            let provenance = cur.provenance.clone();
            self.rows_read += n;
            if n == 0 {
                continue;
            }
            match self.decode(&path, batch, first_row) {
                Ok(Some(mut b)) => {
                    b.provenance = provenance;
                    return Some(Ok(b));
                }
                Ok(None) => continue,
                Err(e) => return self.fail(e),
            }
        }
    }
}
