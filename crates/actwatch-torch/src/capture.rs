//! Capture: run a TorchScript model over token ids read from Parquet and emit its hidden states as
//! traces.
//!
//! **The model contract.** `forward(input_ids: int64[B, T], attention_mask: int64[B, T])` returns
//! the hidden states as a tuple (or list) of tensors `[B, T, d]`: element 0 the embeddings' output,
//! element L the output of block L (Hugging Face's `output_hidden_states` order), any float dtype.
//! Sequences are right-padded with id 0 and mask 0. `scripts/export_minilm.py` exports
//! all-MiniLM-L6-v2 this way.
//!
//! **The inputs.** Parquet with a string (or integer) id column, `input_ids` as `list<int64>`
//! (any integer list type; one unpadded sequence per row) and, optionally, `attention_mask`
//! (same lengths, 0 or 1; default all ones). Column names are options.
//!
//! **The output.** actwatch's long format: one trace per (sequence, site) with `--pool mean`
//! (attention-mask weighted mean over tokens, special tokens included), or one per (token, site)
//! with `--pool none`, plus a `position` column (token index). Sites are hidden-state indices.
//!
//! Memory is bounded: the inputs are read a window of rows at a time (row group by row group),
//! each window is sorted by length into batches (less padding) and written back in input order.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actwatch_core::{SiteBatch, Vectors};
use actwatch_io::reader::TraceColumns;
use actwatch_io::writer::{TraceWriter, DEFAULT_POSITION_COLUMN};
use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::{Error, Result};

/// Default input column names.
pub const DEFAULT_ID_COLUMN: &str = "id";
pub const DEFAULT_INPUT_IDS_COLUMN: &str = "input_ids";
pub const DEFAULT_ATTENTION_MASK_COLUMN: &str = "attention_mask";
/// Default sequences per forward pass.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Batches per window of input rows (sorted by length within a window, so that batches pad
/// little): wide when pooling (a window holds one vector per row and site), narrower per token.
const WINDOW_BATCHES_POOLED: usize = 32;
const WINDOW_BATCHES_PER_TOKEN: usize = 8;

/// How hidden states become traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// One trace per sequence and site: the attention-mask weighted mean over tokens.
    Mean,
    /// One trace per token and site (tokens with attention mask 1), with its position.
    None,
}

/// Names of the input columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputColumns {
    pub id: String,
    pub input_ids: String,
    /// Used when present in the file; all ones otherwise.
    pub attention_mask: String,
}

impl Default for InputColumns {
    fn default() -> Self {
        Self {
            id: DEFAULT_ID_COLUMN.into(),
            input_ids: DEFAULT_INPUT_IDS_COLUMN.into(),
            attention_mask: DEFAULT_ATTENTION_MASK_COLUMN.into(),
        }
    }
}

/// Names of the output columns (actwatch's long format; the defaults are the reader's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputColumns {
    pub trace: String,
    pub site: String,
    pub vector: String,
    /// Written with [`Pool::None`] only.
    pub position: String,
}

impl Default for OutputColumns {
    fn default() -> Self {
        Self {
            trace: actwatch_io::reader::DEFAULT_TRACE_COLUMN.into(),
            site: actwatch_io::reader::DEFAULT_SITE_COLUMN.into(),
            vector: actwatch_io::reader::DEFAULT_VECTOR_COLUMN.into(),
            position: DEFAULT_POSITION_COLUMN.into(),
        }
    }
}

/// What to capture.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Hidden-state indices to keep (0 = embeddings, L = block L), at least one.
    pub sites: Vec<usize>,
    pub pool: Pool,
    /// Sequences per forward pass (>= 1).
    pub batch_size: usize,
    pub columns: InputColumns,
}

/// What a capture did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptureSummary {
    pub sequences: u64,
    /// Tokens with attention mask 1.
    pub tokens: u64,
    pub traces: u64,
    /// Time in the model and pooling (reading and writing excluded).
    pub model_seconds: f64,
    pub seconds: f64,
}

/// Receives the traces of one site for a run of sequences, in input order (positions with
/// [`Pool::None`] only). The site is the hidden-state index, as a name (`"2"`).
pub trait TraceSink {
    fn write(&mut self, batch: SiteBatch) -> Result<()>;
}

/// A loaded TorchScript model.
pub struct Model {
    module: CModule,
    path: PathBuf,
    device: Device,
}

impl Model {
    /// Loads `path` onto `device` in evaluation mode.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(path, "no such TorchScript file"));
        }
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            Error::model(
                path,
                format!("cannot load it as TorchScript: {}", first_line(&e)),
            )
        })?;
        module
            .f_set_eval()
            .map_err(|e| Error::model(path, format!("cannot switch to eval mode: {e}")))?;
        Ok(Self {
            module,
            path: path.to_path_buf(),
            device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs forward on one padded batch and returns its hidden states as f32 `[B, T, d]` tensors,
    /// checked against the contract. `what` names the rows, for errors.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        let out = self
            .module
            .forward_is(&[
                IValue::Tensor(ids.shallow_clone()),
                IValue::Tensor(mask.shallow_clone()),
            ])
            .map_err(|e| {
                Error::model(
                    &self.path,
                    format!("forward failed on {what}: {}", first_line(&e)),
                )
            })?;
        let items: Vec<IValue> = match out {
            IValue::Tuple(v) | IValue::GenericList(v) => v,
            IValue::TensorList(v) => v.into_iter().map(IValue::Tensor).collect(),
            other => {
                return Err(Error::model(
                    &self.path,
                    format!(
                        "forward returned {}, not a tuple of hidden states [batch, tokens, width] \
                         (see `actwatch capture --help` for the contract)",
                        ivalue_kind(&other)
                    ),
                ))
            }
        };
        let (b, t) = (ids.size()[0], ids.size()[1]);
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                IValue::Tensor(h) if h.size().len() == 3 && h.size()[..2] == [b, t] => {
                    if matches!(
                        h.f_kind(),
                        Ok(Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
                    ) {
                        Ok(h.f_to_kind(Kind::Float)?)
                    } else {
                        Err(Error::model(
                            &self.path,
                            format!("hidden state {i} is not a float tensor ({:?})", h.kind()),
                        ))
                    }
                }
                IValue::Tensor(h) => Err(Error::model(
                    &self.path,
                    format!(
                        "hidden state {i} has shape {:?}; expected [batch {b}, tokens {t}, width]",
                        h.size()
                    ),
                )),
                other => Err(Error::model(
                    &self.path,
                    format!(
                        "element {i} of forward's output is {}, not a tensor",
                        ivalue_kind(&other)
                    ),
                )),
            })
            .collect()
    }
}

fn first_line(e: &tch::TchError) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").to_string()
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a single tensor",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a scalar",
        IValue::String(_) => "a string",
        IValue::GenericDict(_) => "a dict",
        IValue::Tuple(_) | IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        _ => "a non-tensor value",
    }
}

/// One window of decoded input rows.
struct Window {
    ids: Vec<String>,
    /// Per row: token ids and mask (same length, >= 1).
    tokens: Vec<Vec<i64>>,
    masks: Vec<Vec<i64>>,
}

/// Streams windows of rows from one inputs file.
struct InputReader {
    path: PathBuf,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    has_mask: bool,
    columns: InputColumns,
    next_row: u64,
}

impl InputReader {
    fn open(path: &Path, columns: &InputColumns, window: usize) -> Result<Self> {
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

    fn next_window(&mut self) -> Result<Option<(u64, Window)>> {
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
            for (i, (t, m)) in tokens.iter().zip(&m).enumerate() {
                let row = first + i as u64;
                if t.len() != m.len() {
                    return Err(Error::input(
                        path,
                        format!(
                            "row {row}: {:?} has {} values but {:?} has {} (ragged)",
                            self.columns.input_ids,
                            t.len(),
                            self.columns.attention_mask,
                            m.len()
                        ),
                    ));
                }
                if m.iter().any(|&v| v != 0 && v != 1) {
                    return Err(Error::input(
                        path,
                        format!(
                            "row {row}: {:?} holds a value other than 0 and 1",
                            self.columns.attention_mask
                        ),
                    ));
                }
                if !m.contains(&1) {
                    return Err(Error::input(
                        path,
                        format!(
                            "row {row}: {:?} masks every token",
                            self.columns.attention_mask
                        ),
                    ));
                }
            }
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

/// Runs `model` over every row of `inputs` and hands the traces to `sink`, window by window in
/// input order. `progress` gets the number of sequences done after each window.
pub fn capture(
    model: &Model,
    inputs: &[PathBuf],
    options: &CaptureOptions,
    sink: &mut dyn TraceSink,
    mut progress: impl FnMut(u64),
) -> Result<CaptureSummary> {
    if options.sites.is_empty() {
        return Err(Error::InvalidOption("no sites to capture".into()));
    }
    if let Some(s) = options
        .sites
        .iter()
        .enumerate()
        .find_map(|(i, s)| options.sites[..i].contains(s).then_some(s))
    {
        return Err(Error::InvalidOption(format!(
            "--sites names site {s} twice"
        )));
    }
    if options.batch_size == 0 {
        return Err(Error::InvalidOption(
            "the batch size must be at least 1".into(),
        ));
    }
    let started = Instant::now();
    let _guard = tch::no_grad_guard();
    let mut summary = CaptureSummary::default();
    let window = options.batch_size
        * match options.pool {
            Pool::Mean => WINDOW_BATCHES_POOLED,
            Pool::None => WINDOW_BATCHES_PER_TOKEN,
        };
    for path in inputs {
        let mut reader = InputReader::open(path, &options.columns, window)?;
        while let Some((first, w)) = reader.next_window()? {
            let t0 = Instant::now();
            let per_site = run_window(model, &w, first, path, options)?;
            summary.model_seconds += t0.elapsed().as_secs_f64();
            for (site, traces) in options.sites.iter().zip(per_site) {
                let rows = traces.ids.len() as u64;
                sink.write(SiteBatch::new(
                    site.to_string(),
                    traces.ids,
                    traces.positions,
                    Vectors::new(traces.dim, traces.values)?,
                )?)?;
                summary.traces += rows;
            }
            summary.sequences += w.ids.len() as u64;
            summary.tokens += w.masks.iter().flatten().filter(|&&m| m == 1).count() as u64;
            progress(summary.sequences);
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Traces of one site for one window, in input order.
struct SiteTraces {
    ids: Vec<String>,
    positions: Option<Vec<i32>>,
    dim: usize,
    values: Vec<f32>,
}

fn run_window(
    model: &Model,
    w: &Window,
    first: u64,
    path: &Path,
    options: &CaptureOptions,
) -> Result<Vec<SiteTraces>> {
    let n = w.ids.len();
    // Sorted by length (stable), so each batch pads little; results go back to input order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| w.tokens[i].len());
    // Per site, per input row: pooled vector or per-token vectors.
    let mut rows: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); n]; options.sites.len()];
    let mut dims = vec![0usize; options.sites.len()];
    for batch in order.chunks(options.batch_size) {
        let t = batch.iter().map(|&i| w.tokens[i].len()).max().unwrap_or(1);
        let b = batch.len();
        let mut ids = vec![0i64; b * t];
        let mut mask = vec![0i64; b * t];
        for (r, &i) in batch.iter().enumerate() {
            let len = w.tokens[i].len();
            ids[r * t..r * t + len].copy_from_slice(&w.tokens[i]);
            mask[r * t..r * t + len].copy_from_slice(&w.masks[i]);
        }
        let shape = [b as i64, t as i64];
        let ids_t = Tensor::f_from_slice(&ids)?
            .f_reshape(shape)?
            .f_to_device(model.device)?;
        let mask_t = Tensor::f_from_slice(&mask)?
            .f_reshape(shape)?
            .f_to_device(model.device)?;
        let lo = first + *batch.iter().min().unwrap() as u64;
        let hi = first + *batch.iter().max().unwrap() as u64;
        let what = format!("rows {lo}..={hi} of {}", path.display());
        let hidden = model.hidden_states(&ids_t, &mask_t, &what)?;
        if let Some(&bad) = options.sites.iter().find(|&&s| s >= hidden.len()) {
            return Err(Error::model(
                &model.path,
                format!(
                    "forward returned {} hidden states (sites 0..={}); site {bad} was asked for",
                    hidden.len(),
                    hidden.len().saturating_sub(1)
                ),
            ));
        }
        for (k, &site) in options.sites.iter().enumerate() {
            let h = &hidden[site];
            let d = h.size()[2] as usize;
            dims[k] = d;
            match options.pool {
                Pool::Mean => {
                    let m = mask_t.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
                    let sum =
                        h.f_mul(&m)?
                            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?;
                    let count = m
                        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?
                        .f_clamp_min(1e-9)?;
                    let pooled = to_host_f32(&sum.f_div(&count)?)?;
                    for (r, &i) in batch.iter().enumerate() {
                        rows[k][i] = pooled[r * d..(r + 1) * d].to_vec();
                    }
                }
                Pool::None => {
                    let all = to_host_f32(h)?;
                    for (r, &i) in batch.iter().enumerate() {
                        let mut v = Vec::with_capacity(w.tokens[i].len() * d);
                        for (p, &m) in w.masks[i].iter().enumerate() {
                            if m == 1 {
                                v.extend_from_slice(&all[(r * t + p) * d..(r * t + p + 1) * d]);
                            }
                        }
                        rows[k][i] = v;
                    }
                }
            }
        }
    }
    Ok(rows
        .into_iter()
        .zip(dims)
        .map(|(per_row, dim)| {
            let mut out = SiteTraces {
                ids: Vec::new(),
                positions: (options.pool == Pool::None).then(Vec::new),
                dim,
                values: Vec::new(),
            };
            for (i, v) in per_row.into_iter().enumerate() {
                match &mut out.positions {
                    None => out.ids.push(w.ids[i].clone()),
                    Some(pos) => {
                        for (p, _) in w.masks[i].iter().enumerate().filter(|(_, &m)| m == 1) {
                            out.ids.push(w.ids[i].clone());
                            pos.push(p as i32);
                        }
                    }
                }
                out.values.extend_from_slice(&v);
            }
            out
        })
        .collect())
}

fn to_host_f32(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    let n = t.numel();
    let mut out = vec![0.0f32; n];
    t.f_copy_data(&mut out, n)?;
    Ok(out)
}

/// Writes traces to a Parquet file in the long format (through actwatch-io's [`TraceWriter`], the
/// writer of the server's reference segments too); the file appears only when
/// [`ParquetSink::finish`] succeeds (dropped unfinished, it leaves nothing behind).
pub struct ParquetSink {
    path: PathBuf,
    columns: OutputColumns,
    per_token: bool,
    writer: Option<TraceWriter>,
}

impl ParquetSink {
    pub fn new(path: &Path, columns: OutputColumns, pool: Pool) -> Self {
        Self {
            path: path.to_path_buf(),
            columns,
            per_token: pool == Pool::None,
            writer: None,
        }
    }

    /// Finishes the file (fsync, rename into place); returns the rows written. Nothing captured
    /// still writes a valid, empty file only if a width is known, so an empty input is an error.
    pub fn finish(self) -> Result<u64> {
        match self.writer {
            Some(w) => Ok(w.finish()?),
            None => Err(Error::InvalidOption(format!(
                "nothing captured: no input rows, so {} was not written",
                self.path.display()
            ))),
        }
    }
}

impl TraceSink for ParquetSink {
    fn write(&mut self, batch: SiteBatch) -> Result<()> {
        let writer = match &mut self.writer {
            Some(w) => w,
            None => {
                let columns = TraceColumns::new(
                    &self.columns.trace,
                    &self.columns.site,
                    &self.columns.vector,
                );
                let positions = self.per_token.then_some(self.columns.position.as_str());
                self.writer.insert(TraceWriter::create(
                    &self.path,
                    batch.dim(),
                    &columns,
                    positions,
                )?)
            }
        };
        if batch.dim() != writer.width() {
            return Err(Error::InvalidOption(format!(
                "site {} has width {}, an earlier site {}: one Parquet vector column holds one \
                 width (capture those sites into separate files)",
                batch.site(),
                batch.dim(),
                writer.width()
            )));
        }
        Ok(writer.write(batch)?)
    }
}
