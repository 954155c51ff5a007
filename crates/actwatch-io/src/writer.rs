//! File writers: [`AtomicParquetWriter`] (any schema, the file appears only when complete),
//! [`AtomicIpcWriter`] (an Arrow IPC file, the same way: the server's reference segments) and
//! [`TraceWriter`] (traces in the canonical long format, the one writer of reference segments and
//! captured traces alike).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::{Dtype, Provenance, SiteBatch};
use arrow::array::{
    ArrayRef, DictionaryArray, FixedSizeBinaryArray, FixedSizeListArray, Float16Array,
    Float32Array, Int32Array, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::checksum;
use crate::durable::{AtomicFile, StreamRelease};
use crate::provenance::{FileProvenance, PROVENANCE_KEY};
use crate::reader::TraceColumns;
use crate::{Error, Result};

/// Default name of the token-position column.
pub const DEFAULT_POSITION_COLUMN: &str = "position";

/// The most encoded bytes a Parquet file written here holds in memory before it writes them out
/// as a row group. The Parquet writer buffers a whole row group's pages until the group is done,
/// and by default a group ends only at 1,048,576 rows (16 GiB of vectors at width 4,096), so an
/// IngestReference stream held all it had sent until its commit and then wrote and hashed
/// everything at once, after the last message. Bounded by bytes, a stream's segment costs at
/// most this much memory (plus the two batches in flight), and its disk writes overlap the
/// messages still arriving. 16 MiB is about 1,000 vectors at width 4,096 and 11,000 at 384: far
/// above the page sizes a reader fetches, so readers lose nothing.
pub const ROW_GROUP_BYTES: usize = 16 << 20;

/// Writer properties used by [`AtomicParquetWriter::create`]: zstd (level 3), row groups of at
/// most [`ROW_GROUP_BYTES`].
pub fn default_writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid zstd level"),
        ))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .build()
}

/// The file under an [`AtomicIpcWriter`] (a reference segment), hashing what goes into it: the
/// writer only appends, so the bytes written here are the file's bytes, in order, and the file's
/// checksum ([`crate::checksum`]) costs no second read.
struct HashedFile {
    file: AtomicFile,
    /// Boxed: the hasher's state is larger than the rest of the writer.
    hasher: Box<checksum::Hasher>,
    /// Its pages leave the page cache as they are written back, [`RELEASE_WINDOW_BYTES`] behind
    /// the writer ([`StreamRelease`]).
    release: StreamRelease,
}

impl Write for HashedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.release.wrote(&self.file, n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes a Parquet file atomically through [`AtomicFile`]: under a temporary name, then fsync,
/// rename onto `path` and fsync of the directory in [`AtomicParquetWriter::finish`]. Dropped
/// without `finish`, it removes the temporary file and leaves `path` untouched. Schema-agnostic:
/// writes whatever batches it is given (they must match the schema it was created with).
pub struct AtomicParquetWriter {
    path: PathBuf,
    writer: ArrowWriter<AtomicFile>,
    rows: u64,
}

impl std::fmt::Debug for AtomicParquetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicParquetWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl AtomicParquetWriter {
    /// Starts writing `path` with zstd compression ([`default_writer_properties`]).
    pub fn create(path: impl Into<PathBuf>, schema: SchemaRef) -> Result<Self> {
        Self::create_with_properties(path, schema, default_writer_properties())
    }

    /// Starts writing `path` with the given writer properties.
    pub fn create_with_properties(
        path: impl Into<PathBuf>,
        schema: SchemaRef,
        props: WriterProperties,
    ) -> Result<Self> {
        let path = path.into();
        let file = AtomicFile::create(&path)?;
        let writer = ArrowWriter::try_new(file, schema, Some(props))
            .map_err(|e| Error::parquet(&path, e))?;
        Ok(Self {
            path,
            writer,
            rows: 0,
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends one batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .map_err(|e| Error::parquet(&self.path, e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Adds a key-value entry to the file's footer metadata.
    pub fn append_metadata(&mut self, key: &str, value: String) {
        self.writer
            .append_key_value_metadata(KeyValue::new(key.to_string(), value));
    }

    /// Writes the footer and commits the file ([`AtomicFile::commit`]). Returns the rows written.
    pub fn finish(self) -> Result<u64> {
        let file = self
            .writer
            .into_inner()
            .map_err(|e| Error::parquet(&self.path, e))?;
        file.commit()?;
        Ok(self.rows)
    }
}

/// How far behind the writer a reference segment's pages leave the page cache
/// ([`StreamRelease`]): far enough that write-back has started on them, near enough that the
/// page cache never holds much of a long stream (16 MiB, chosen when it was a Parquet row group).
pub const RELEASE_WINDOW_BYTES: u64 = 16 << 20;

/// The most bytes of small batches an [`AtomicIpcWriter`] holds before it writes them as one
/// record batch. A batch of at least a quarter of this is written as it comes (its buffers go
/// straight to the file); smaller ones are gathered (one copy) so that a client sending a row
/// at a time does not leave a file of one-row blocks, each with its own header to write and,
/// later, to read and check.
pub const IPC_BATCH_BYTES: usize = 1 << 20;

/// Writes an Arrow IPC file (the file format, `ARROW1`, which `pyarrow.ipc.open_file` reads) atomically
/// through [`AtomicFile`], as [`AtomicParquetWriter`] does, hashing its bytes as they are written
/// and releasing its pages from the page cache behind the writer ([`StreamRelease`]): the
/// server's reference segments. A record batch's buffers are written to the file as they are,
/// with no encoding and no copy in between (the IPC writer hands each buffer to `write`), which
/// is what makes it the hot path's format: the Parquet writer copied every value three times
/// (its page, its column chunk, its row group) and spent most of an ingest's CPU doing so.
pub struct AtomicIpcWriter {
    path: PathBuf,
    writer: FileWriter<HashedFile>,
    rows: u64,
    /// Small batches not yet written ([`IPC_BATCH_BYTES`]), and their bytes.
    pending: Vec<RecordBatch>,
    pending_bytes: usize,
}

impl std::fmt::Debug for AtomicIpcWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicIpcWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl AtomicIpcWriter {
    /// Starts writing `path` (under a temporary name until [`AtomicIpcWriter::finish_hashed`]).
    pub fn create_hashed(path: impl Into<PathBuf>, schema: SchemaRef) -> Result<Self> {
        let path = path.into();
        let file = HashedFile {
            file: AtomicFile::create(&path)?,
            hasher: Box::default(),
            release: StreamRelease::new(RELEASE_WINDOW_BYTES),
        };
        let writer = FileWriter::try_new(file, &schema).map_err(|e| ipc_write_error(&path, e))?;
        Ok(Self {
            path,
            writer,
            rows: 0,
            pending: Vec::new(),
            pending_bytes: 0,
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows written so far (those gathered but not yet written included).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends one batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let bytes = batch.get_array_memory_size();
        self.rows += batch.num_rows() as u64;
        if bytes >= IPC_BATCH_BYTES / 4 {
            self.write_pending()?;
            return self
                .writer
                .write(batch)
                .map_err(|e| ipc_write_error(&self.path, e));
        }
        self.pending.push(batch.clone());
        self.pending_bytes += bytes;
        if self.pending_bytes >= IPC_BATCH_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = arrow::compute::concat_batches(self.writer.schema(), &self.pending)?;
        self.pending.clear();
        self.pending_bytes = 0;
        self.writer
            .write(&batch)
            .map_err(|e| ipc_write_error(&self.path, e))
    }

    /// Adds a key-value entry to the file's footer (its custom metadata).
    pub fn append_metadata(&mut self, key: &str, value: String) {
        self.writer.write_metadata(key, value);
    }

    /// Writes what is gathered and the footer, and commits the file ([`AtomicFile::commit`]).
    /// Returns the rows written and the checksum ([`crate::checksum`]) of the file's bytes.
    pub fn finish_hashed(mut self) -> Result<(u64, String)> {
        self.write_pending()?;
        self.writer
            .finish()
            .map_err(|e| ipc_write_error(&self.path, e))?;
        let file = self
            .writer
            .into_inner()
            .map_err(|e| ipc_write_error(&self.path, e))?;
        let sum = file.hasher.hex();
        file.file.commit()?;
        Ok((self.rows, sum))
    }
}

/// An error of the IPC writer: the io error of a write it could not make as that (a full disk
/// stays recognisable), anything else as a write error naming the file.
fn ipc_write_error(path: &Path, e: arrow::error::ArrowError) -> Error {
    match e {
        arrow::error::ArrowError::IoError(_, source) => Error::io(path, source),
        e => Error::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    }
}

/// Where a [`TraceWriter`] writes: a Parquet file, or an Arrow IPC file for a reference segment.
#[derive(Debug)]
enum Sink {
    Parquet(AtomicParquetWriter),
    Ipc(AtomicIpcWriter),
}

impl Sink {
    fn path(&self) -> &Path {
        match self {
            Sink::Parquet(w) => w.path(),
            Sink::Ipc(w) => w.path(),
        }
    }

    fn rows(&self) -> u64 {
        match self {
            Sink::Parquet(w) => w.rows(),
            Sink::Ipc(w) => w.rows(),
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Sink::Parquet(w) => w.write(batch),
            Sink::Ipc(w) => w.write(batch),
        }
    }

    fn append_metadata(&mut self, key: &str, value: String) {
        match self {
            Sink::Parquet(w) => w.append_metadata(key, value),
            Sink::Ipc(w) => w.append_metadata(key, value),
        }
    }

    fn finish_hashed(self) -> Result<(u64, String)> {
        match self {
            Sink::Parquet(w) => Err(Error::Write {
                path: w.path().to_path_buf(),
                message: "the writer was not created to hash the file (create_segment)".into(),
            }),
            Sink::Ipc(w) => w.finish_hashed(),
        }
    }

    fn finish(self) -> Result<u64> {
        match self {
            Sink::Parquet(w) => w.finish(),
            Sink::Ipc(w) => w.finish_hashed().map(|(rows, _)| rows),
        }
    }
}

/// Writes traces to one file in the canonical long format: a computation-id column (Utf8), a site
/// column (strings), optionally a token-position column (Int32, null for batches without
/// positions) and the vector column, named by [`TraceColumns`]. Two layouts:
/// - [`TraceWriter::create`]: a Parquet file (`actwatch capture`'s), the site dictionary-encoded
///   (each batch stores its site once), vectors as `FixedSizeList<Float32>[width]`;
/// - [`TraceWriter::create_segment`]: an Arrow IPC file (the server's reference segments), the
///   site as plain strings (the IPC file format cannot replace a dictionary between batches),
///   vectors as raw rows ([`row_field`]).
///
/// One file holds one width. The file appears only when
/// [`TraceWriter::finish`] succeeds. What the batches declare of their provenance goes into the
/// footer ([`crate::provenance`]); two batches of one site that declare conflicting provenance
/// are refused.
///
/// The decision a reader must know: activations are nearly incompressible (the shared MiniLM
/// files shrink by about 5% under zstd), so the vector column is stored plain: no compression, no
/// dictionary attempt, no min/max statistics, which together cost more write time than anything
/// else here (the Parquet writer goes from about 340 to 570 MB/s on the development machine).
/// Ids and site names compress well and cheaply, so they keep zstd in Parquet.
#[derive(Debug)]
pub struct TraceWriter {
    writer: Sink,
    schema: SchemaRef,
    width: usize,
    /// The type the vectors are stored in.
    dtype: Dtype,
    /// Whether each vector is stored as one binary row ([`row_field`]) rather than a list.
    rows: bool,
    positions: bool,
    /// A file of labelled examples ([`TraceWriter::create_labelled`]) has a boolean label
    /// column after the vectors.
    labelled: bool,
    /// Per site: what its batches declared.
    provenance: BTreeMap<String, Provenance>,
}

impl TraceWriter {
    /// Starts writing `path` for vectors of `width`; with `positions`, the file has a position
    /// column named `position_column`.
    pub fn create(
        path: impl Into<PathBuf>,
        width: usize,
        columns: &TraceColumns,
        positions: Option<&str>,
    ) -> Result<Self> {
        Self::create_with(
            path.into(),
            width,
            columns,
            positions,
            None,
            false,
            Dtype::F32,
        )
    }

    /// [`TraceWriter::create`] for labelled examples: the file also has a boolean column
    /// `label_column`, written by [`TraceWriter::write_labelled`].
    pub fn create_labelled(
        path: impl Into<PathBuf>,
        width: usize,
        columns: &TraceColumns,
        positions: Option<&str>,
        label_column: &str,
    ) -> Result<Self> {
        Self::create_with(
            path.into(),
            width,
            columns,
            positions,
            Some(label_column),
            false,
            Dtype::F32,
        )
    }

    /// A reference segment: an Arrow IPC file ([`AtomicIpcWriter`]) with the columns of
    /// [`TraceWriter::create`] (and with `label_column`, of [`TraceWriter::create_labelled`]),
    /// hashing the file's bytes as they are written, so that [`TraceWriter::finish_hashed`]
    /// returns their checksum ([`crate::checksum`]) without reading the file back (the server
    /// records it and verifies it before every fit), its vectors stored as `dtype`, one binary
    /// row per vector ([`row_field`]): the wire's bytes, written without per-element work.
    ///
    /// The values are rounded to `dtype` as they are written (to nearest, ties to even), so a
    /// writer of `F16` or `Bf16` keeps them exactly only when they came in that type: the server
    /// stores each batch in the type it arrived in, half the bytes of `f32` for the half types.
    pub fn create_segment(
        path: impl Into<PathBuf>,
        width: usize,
        columns: &TraceColumns,
        positions: Option<&str>,
        label_column: Option<&str>,
        dtype: Dtype,
    ) -> Result<Self> {
        let path = path.into();
        Self::create_with(path, width, columns, positions, label_column, true, dtype)
    }

    fn create_with(
        path: PathBuf,
        width: usize,
        columns: &TraceColumns,
        positions: Option<&str>,
        label_column: Option<&str>,
        segment: bool,
        dtype: Dtype,
    ) -> Result<Self> {
        if width == 0 || i32::try_from(width).is_err() {
            return Err(Error::Write {
                path,
                message: format!("cannot write vectors of width {width}"),
            });
        }
        let site = match segment {
            true => DataType::Utf8,
            false => site_type(),
        };
        let mut fields = vec![
            Field::new(&columns.trace, DataType::Utf8, false),
            Field::new(&columns.site, site, false),
        ];
        if let Some(name) = positions {
            fields.push(Field::new(name, DataType::Int32, true));
        }
        if i32::try_from(2 * width).is_err() {
            return Err(Error::Write {
                path,
                message: format!("cannot write vectors of width {width}"),
            });
        }
        fields.push(match segment {
            true => row_field(&columns.vector, width, dtype),
            false => vector_field(&columns.vector, width, dtype),
        });
        if let Some(name) = label_column {
            fields.push(Field::new(name, DataType::Boolean, false));
        }
        let schema = Arc::new(Schema::new(fields));
        let rows = segment || dtype == Dtype::Bf16;
        if segment {
            return Ok(Self {
                writer: Sink::Ipc(AtomicIpcWriter::create_hashed(path, schema.clone())?),
                schema,
                width,
                dtype,
                rows,
                positions: positions.is_some(),
                labelled: label_column.is_some(),
                provenance: BTreeMap::new(),
            });
        }
        let vectors = match rows {
            false => ColumnPath::new(vec![columns.vector.clone(), "list".into(), "item".into()]),
            true => ColumnPath::new(vec![columns.vector.clone()]),
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_column_compression(vectors.clone(), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(vectors.clone(), false)
            .set_column_statistics_enabled(vectors, EnabledStatistics::None)
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .build();
        let writer = AtomicParquetWriter::create_with_properties(path, schema.clone(), props)?;
        Ok(Self {
            writer: Sink::Parquet(writer),
            schema,
            width,
            dtype,
            rows,
            positions: positions.is_some(),
            labelled: label_column.is_some(),
            provenance: BTreeMap::new(),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        self.writer.path()
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.writer.rows()
    }

    /// Appends a batch (its vectors move into the Arrow column without a copy). Fails if its
    /// width differs, or if it carries positions and the file has no position column.
    pub fn write(&mut self, batch: SiteBatch) -> Result<()> {
        self.write_rows(batch, None)
    }

    /// Appends labelled examples (one label per row) to a file made by
    /// [`TraceWriter::create_labelled`].
    pub fn write_labelled(&mut self, batch: SiteBatch, labels: Vec<bool>) -> Result<()> {
        self.write_rows(batch, Some(labels))
    }

    fn write_rows(&mut self, batch: SiteBatch, labels: Option<Vec<bool>>) -> Result<()> {
        if labels.is_some() != self.labelled
            || labels.as_ref().is_some_and(|l| l.len() != batch.rows())
        {
            return Err(Error::Write {
                path: self.path().to_path_buf(),
                message: format!(
                    "{} labels for {} rows, in a file {}",
                    labels.as_ref().map_or(0, Vec::len),
                    batch.rows(),
                    if self.labelled {
                        "of labelled examples"
                    } else {
                        "without labels"
                    }
                ),
            });
        }
        if batch.dim() != self.width {
            return Err(Error::Write {
                path: self.path().to_path_buf(),
                message: format!(
                    "site {:?} has width {}, but this file holds width {}",
                    batch.site(),
                    batch.dim(),
                    self.width
                ),
            });
        }
        if batch.positions().is_some() && !self.positions {
            return Err(Error::Write {
                path: self.path().to_path_buf(),
                message: "the batch has token positions, but the file has no position column"
                    .into(),
            });
        }
        if let Some(p) = batch.provenance() {
            let recorded = self.provenance.entry(batch.site().to_string()).or_default();
            recorded.merge(p).map_err(|c| Error::Write {
                path: self.writer.path().to_path_buf(),
                message: format!(
                    "site {:?}: a batch declares {} {:?}, an earlier one {:?}",
                    batch.site(),
                    c.field,
                    c.declared,
                    c.recorded
                ),
            })?;
        }
        let rows = batch.rows();
        let (site, trace_ids, positions, vectors) = batch.into_parts();
        let width = self.width as i32;
        let item = |dt| Arc::new(Field::new("item", dt, false));
        let vectors: ArrayRef = match (self.rows, self.dtype) {
            (true, dtype) => Arc::new(FixedSizeBinaryArray::try_new(
                (dtype.size() * self.width) as i32,
                le_bytes(vectors.into_inner(), dtype),
                None,
            )?),
            (false, Dtype::F32) => {
                let values = Arc::new(Float32Array::from(vectors.into_inner()));
                Arc::new(FixedSizeListArray::try_new(
                    item(DataType::Float32),
                    width,
                    values,
                    None,
                )?)
            }
            (false, Dtype::F16) => {
                let values = Arc::new(Float16Array::from_iter_values(
                    vectors.as_slice().iter().map(|&x| half::f16::from_f32(x)),
                ));
                Arc::new(FixedSizeListArray::try_new(
                    item(DataType::Float16),
                    width,
                    values,
                    None,
                )?)
            }
            (false, Dtype::Bf16) => unreachable!("bfloat16 is always stored as rows"),
        };
        let sites: ArrayRef = match &self.writer {
            // The site once per batch (a one-value dictionary), not once per row.
            Sink::Parquet(_) => Arc::new(DictionaryArray::new(
                Int32Array::from(vec![0; rows]),
                Arc::new(StringArray::from(vec![site])),
            )),
            Sink::Ipc(_) => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                site.as_str(),
                rows,
            ))),
        };
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(trace_ids)), sites];
        if self.positions {
            columns.push(Arc::new(match positions {
                Some(p) => Int32Array::from(p),
                None => Int32Array::new_null(rows),
            }));
        }
        columns.push(Arc::new(vectors));
        if let Some(labels) = labels {
            columns.push(Arc::new(arrow::array::BooleanArray::from(labels)));
        }
        self.writer
            .write(&RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// Commits the file (with the provenance its batches declared); returns the rows written.
    pub fn finish(mut self) -> Result<u64> {
        self.add_provenance()?;
        self.writer.finish()
    }

    /// [`TraceWriter::finish`] for a writer made by [`TraceWriter::create_segment`]: the rows
    /// written and the checksum ([`crate::checksum`]) of the committed file's bytes.
    pub fn finish_hashed(mut self) -> Result<(u64, String)> {
        self.add_provenance()?;
        self.writer.finish_hashed()
    }

    fn add_provenance(&mut self) -> Result<()> {
        if self.provenance.values().any(|p| !p.is_empty()) {
            let json = FileProvenance::encode(&self.provenance)?;
            self.writer.append_metadata(PROVENANCE_KEY, json);
        }
        Ok(())
    }
}

/// The site column's type: strings as a dictionary with 32-bit keys.
fn site_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// The metadata key, on a vector column's field, that says how its values are encoded when the
/// Arrow type does not: on a `FixedSizeBinary(size x d)` column, each row the little-endian
/// values of one vector, [`FLOAT32`], [`FLOAT16`] or [`BFLOAT16`] ([`row_field`]).
pub const VECTOR_DTYPE_KEY: &str = "actwatch.dtype";
/// [`VECTOR_DTYPE_KEY`]'s value for float32 rows.
pub const FLOAT32: &str = "float32";
/// [`VECTOR_DTYPE_KEY`]'s value for float16 rows.
pub const FLOAT16: &str = "float16";
/// [`VECTOR_DTYPE_KEY`]'s value for bfloat16 rows.
pub const BFLOAT16: &str = "bfloat16";

/// The [`VECTOR_DTYPE_KEY`] value naming `dtype`.
pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => FLOAT32,
        Dtype::F16 => FLOAT16,
        Dtype::Bf16 => BFLOAT16,
    }
}

/// The [`Dtype`] a [`VECTOR_DTYPE_KEY`] value names.
pub fn dtype_named(name: &str) -> Option<Dtype> {
    [Dtype::F32, Dtype::F16, Dtype::Bf16]
        .into_iter()
        .find(|&d| dtype_name(d) == name)
}

/// The vector column's field for vectors of `width` stored as `dtype` in the interchange layout
/// other tools read as arrays (`actwatch capture`'s files): `FixedSizeList<Float32>` or
/// `FixedSizeList<Float16>`; bfloat16, which Arrow has no type for, as [`row_field`] rows.
pub fn vector_field(name: &str, width: usize, dtype: Dtype) -> Field {
    let list =
        |item| DataType::FixedSizeList(Arc::new(Field::new("item", item, false)), width as i32);
    match dtype {
        Dtype::F32 => Field::new(name, list(DataType::Float32), false),
        Dtype::F16 => Field::new(name, list(DataType::Float16), false),
        Dtype::Bf16 => row_field(name, width, dtype),
    }
}

/// The vector column's field for vectors of `width` stored as raw rows: one
/// `FixedSizeBinary(dtype.size() x width)` per vector, its little-endian values as they came off
/// the wire, marked with [`VECTOR_DTYPE_KEY`] (the server's reference segments). A row is one
/// value to the Parquet writer: a list costs a repetition level per element, built and encoded
/// on every write (a quarter of the server's CPU while ingesting f32, by `perf`), and a list of
/// 16-bit integers would be stored as 32-bit.
pub fn row_field(name: &str, width: usize, dtype: Dtype) -> Field {
    Field::new(
        name,
        DataType::FixedSizeBinary((dtype.size() * width) as i32),
        false,
    )
    .with_metadata(std::collections::HashMap::from([(
        VECTOR_DTYPE_KEY.to_string(),
        dtype_name(dtype).to_string(),
    )]))
}

/// `values` as the little-endian bytes of `dtype` (rounded to nearest, ties to even, for the
/// half types), in one buffer: for `f32` the vector's own allocation, not a copy.
fn le_bytes(values: Vec<f32>, dtype: Dtype) -> arrow::buffer::Buffer {
    use arrow::buffer::Buffer;
    // `to_le` leaves a value's bits as they are on little-endian hosts and swaps them elsewhere,
    // so the buffer holds little-endian bytes on any host.
    match dtype {
        Dtype::F32 if cfg!(target_endian = "little") => Buffer::from_vec(values),
        Dtype::F32 => Buffer::from_vec(
            values
                .iter()
                .map(|x| x.to_bits().to_le())
                .collect::<Vec<u32>>(),
        ),
        Dtype::F16 => Buffer::from_vec(
            values
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits().to_le())
                .collect::<Vec<u16>>(),
        ),
        // `half`'s rounding (to nearest, ties to even; a NaN kept quiet), without its branches, so
        // that it vectorises; for a value that came in as bfloat16, its high half.
        Dtype::Bf16 => Buffer::from_vec(
            values
                .iter()
                .map(|&x| {
                    let bits = x.to_bits();
                    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
                    let nan = ((bits >> 16) | 0x0040) as u16;
                    let nearest = if bits & 0x7fff_ffff > 0x7f80_0000 {
                        nan
                    } else {
                        rounded
                    };
                    nearest.to_le()
                })
                .collect::<Vec<u16>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use actwatch_core::Vectors;

    use super::*;

    /// The checksum a hashing writer returns is the checksum of the file it committed.
    #[test]
    fn a_hashing_writer_returns_the_committed_files_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.arrow");
        let columns = TraceColumns::default();
        let mut w =
            TraceWriter::create_segment(&path, 2, &columns, None, None, Dtype::F32).unwrap();
        let rows = (0..100).map(|i| format!("c{i}")).collect();
        let values = (0..200).map(|i| i as f32 / 7.0).collect();
        w.write(SiteBatch::new("s", rows, None, Vectors::new(2, values).unwrap()).unwrap())
            .unwrap();
        let (rows, sum) = w.finish_hashed().unwrap();
        assert_eq!(rows, 100);
        assert_eq!(sum, checksum::of(&std::fs::read(&path).unwrap()));

        let w = TraceWriter::create(dir.path().join("plain.parquet"), 2, &columns, None).unwrap();
        assert!(
            w.finish_hashed().is_err(),
            "a writer that did not hash has no checksum"
        );
    }

    /// Vectors stored as rows of f32, f16 or bfloat16 read back as the same f32 values when they
    /// came in that type, the half types in about half the bytes; the type is marked on the
    /// field, and the same binary column without the marker is refused rather than read as
    /// numbers.
    #[test]
    fn half_precision_segments_read_back_exactly_in_half_the_bytes() {
        use crate::reader::{ReadOptions, TraceReader};
        let dir = tempfile::tempdir().unwrap();
        let columns = TraceColumns::default();
        let (width, rows) = (64, 500);
        let mut rng = actwatch_testkit::Rng::new(7);
        let raw: Vec<f32> = (0..rows * width)
            .map(|_| rng.normal() as f32 * 3.0)
            .collect();
        let mut sizes = Vec::new();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            // Values as they arrive in `dtype` (decoded to f32 at the edge).
            let values: Vec<f32> = match dtype {
                Dtype::F32 => raw.clone(),
                Dtype::F16 => raw
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect(),
                Dtype::Bf16 => raw
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
            };
            let path = dir.path().join(format!("{dtype:?}.arrow"));
            let mut w =
                TraceWriter::create_segment(&path, width, &columns, None, None, dtype).unwrap();
            let ids = (0..rows).map(|i| format!("c{i}")).collect();
            let batch =
                SiteBatch::new("s", ids, None, Vectors::new(width, values.clone()).unwrap());
            w.write(batch.unwrap()).unwrap();
            w.finish_hashed().unwrap();
            sizes.push(std::fs::metadata(&path).unwrap().len());
            let read: Vec<f32> = TraceReader::open(&[path], ReadOptions::default())
                .unwrap()
                .flat_map(|b| b.unwrap().vectors)
                .collect();
            assert_eq!(
                read.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{dtype:?}"
            );
        }
        let vector_bytes = (rows * width * 2) as u64;
        assert!(sizes[0] - sizes[1] >= vector_bytes * 9 / 10, "{sizes:?}");
        assert!(sizes[0] - sizes[2] >= vector_bytes * 9 / 10, "{sizes:?}");

        // The same words without the marker are not vectors.
        let words = vec![1u8; 2 * 2 * width];
        let list = FixedSizeBinaryArray::try_new(2 * width as i32, words.into(), None).unwrap();
        let batch = RecordBatch::try_from_iter([
            (
                "trace_id",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            (
                "site",
                Arc::new(StringArray::from(vec!["s", "s"])) as ArrayRef,
            ),
            ("activation", Arc::new(list) as ArrayRef),
        ])
        .unwrap();
        let path = dir.path().join("unmarked.parquet");
        let mut w = AtomicParquetWriter::create(&path, batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        let err = TraceReader::open(&[path], ReadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("bfloat16"), "{err}");
    }

    /// The server's segments store f32 vectors as raw rows (since 2026-12-03), earlier ones as
    /// lists: the same batches written both ways read back as the same traces, so a data
    /// directory holding segments of both kinds fits as before.
    #[test]
    fn row_and_list_segments_read_back_the_same_traces() {
        use crate::reader::{ReadOptions, TraceReader};
        let dir = tempfile::tempdir().unwrap();
        let columns = TraceColumns::default();
        let mut rng = actwatch_testkit::Rng::new(11);
        let batches: Vec<SiteBatch> = (0..3)
            .map(|b| {
                let ids = (0..40).map(|i| format!("c{b}-{i}")).collect();
                let positions = (b != 1).then(|| (0..40).collect());
                let values = rng.gaussian_rows(40, 24, 0.0);
                SiteBatch::new(
                    format!("s{}", b % 2),
                    ids,
                    positions,
                    Vectors::new(24, values).unwrap(),
                )
                .unwrap()
            })
            .collect();
        let read = |path: &Path| {
            TraceReader::open(&[path.to_path_buf()], ReadOptions::default())
                .unwrap()
                .map(|b| {
                    let b = b.unwrap();
                    (b.trace_ids, b.sites, b.positions, b.vectors, b.offsets)
                })
                .collect::<Vec<_>>()
        };
        let list = dir.path().join("list.parquet");
        let mut w = TraceWriter::create(&list, 24, &columns, Some("position")).unwrap();
        for b in batches.clone() {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        let rows = dir.path().join("rows.arrow");
        let mut w =
            TraceWriter::create_segment(&rows, 24, &columns, Some("position"), None, Dtype::F32)
                .unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish_hashed().unwrap();
        let (a, b) = (read(&list), read(&rows));
        assert!(!a.is_empty());
        assert_eq!(a, b);
    }

    /// The branch-free bfloat16 rounding is `half`'s (to nearest, ties to even) for every value:
    /// random bit patterns (NaNs and infinities among them), ties both ways, values next to the
    /// largest finite bfloat16, subnormals, signs.
    #[test]
    fn bfloat16_rounding_matches_half() {
        let mut rng = actwatch_testkit::Rng::new(3);
        let mut values: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .collect();
        for bits in [
            0x3f80_8000u32,
            0x3f81_8000,
            0x7f7f_8000,
            0x7f7f_ffff,
            0x0000_8001,
            0x7f80_0001,
            0x7fff_ffff,
        ] {
            values.push(f32::from_bits(bits));
            values.push(-f32::from_bits(bits));
        }
        let got = le_bytes(values.clone(), Dtype::Bf16);
        let want: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(got.as_slice(), want.as_slice());
    }

    /// A segment is written out as its batches come, not held in memory until it is finished
    /// (an ingest stream's memory is bounded by it), and reads back whole in batches of the
    /// reader's size.
    #[test]
    fn a_long_segment_is_written_out_as_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.arrow");
        let columns = TraceColumns::default();
        let (width, rows_per_batch, batches) = (1024, 256, 40); // 1 MiB a batch, 40 MiB in all
        let mut w =
            TraceWriter::create_segment(&path, width, &columns, None, None, Dtype::F32).unwrap();
        for b in 0..batches {
            let ids = (0..rows_per_batch).map(|i| format!("c{b}-{i}")).collect();
            let values = (0..rows_per_batch * width)
                .map(|i| (b * 7 + i % 13) as f32)
                .collect();
            let batch = SiteBatch::new("s", ids, None, Vectors::new(width, values).unwrap());
            w.write(batch.unwrap()).unwrap();
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let all = (rows_per_batch * batches * width * 4) as u64;
        assert!(
            on_disk >= all,
            "only {on_disk} of {all} bytes on disk before the file is finished"
        );
        let (rows, _) = w.finish_hashed().unwrap();
        assert_eq!(rows, (rows_per_batch * batches) as u64);
        assert_eq!(crate::reader::file_rows(&path).unwrap(), rows);
        let opts = crate::reader::ReadOptions {
            batch_rows: 1000,
            ..Default::default()
        };
        let sizes: Vec<usize> = crate::reader::TraceReader::open(&[path], opts)
            .unwrap()
            .map(|b| b.unwrap().trace_ids.len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), rows_per_batch * batches);
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&n| n == 1000),
            "{sizes:?}"
        );
    }

    /// Batches far smaller than [`IPC_BATCH_BYTES`] are gathered into a few record batches, and
    /// read back as written, in order, with their provenance.
    #[test]
    fn small_batches_are_gathered_into_few_blocks_and_read_back_in_order() {
        use crate::reader::{ReadOptions, TraceReader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.arrow");
        let columns = TraceColumns::default();
        let width = 16;
        let mut w = TraceWriter::create_segment(
            &path,
            width,
            &columns,
            Some("position"),
            None,
            Dtype::Bf16,
        )
        .unwrap();
        let provenance = Arc::new(Provenance::from_pairs([("model", "m/1")]).unwrap());
        let mut rng = actwatch_testkit::Rng::new(5);
        let mut sent = Vec::new();
        for b in 0..3000 {
            let values: Vec<f32> = rng
                .gaussian_rows(1, width, 0.0)
                .into_iter()
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect();
            let site = ["a", "b"][b % 2];
            let batch = SiteBatch::new(
                site,
                vec![format!("c{b}")],
                (b % 3 != 0).then(|| vec![b as i32]),
                Vectors::new(width, values.clone()).unwrap(),
            )
            .unwrap()
            .with_provenance(Some(provenance.clone()));
            w.write(batch).unwrap();
            sent.push((format!("c{b}"), site.to_string(), values));
        }
        w.finish_hashed().unwrap();
        // 3000 rows of about 100 bytes each: a few blocks of about IPC_BATCH_BYTES, not 3000.
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 3000 * 200, "{size} bytes");
        let opts = ReadOptions {
            batch_rows: 7,
            ..Default::default()
        };
        let mut got = Vec::new();
        for b in TraceReader::open(&[path], opts).unwrap() {
            let b = b.unwrap();
            assert!(b.len() <= 7);
            assert_eq!(b.provenance("a"), Some(&provenance));
            for i in 0..b.len() {
                got.push((
                    b.trace_ids[i].clone(),
                    b.sites[i].to_string(),
                    b.row_vector(i).to_vec(),
                ));
            }
        }
        assert_eq!(got, sent);
    }
}
