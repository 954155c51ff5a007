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

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use actwatch_core::{Provenance, SiteBatch, Vectors};
use actwatch_io::writer::DEFAULT_POSITION_COLUMN;
use tch::{Device, Kind, Tensor};

use crate::input::{InputReader, Window};
pub use crate::model::Model;
pub use crate::sink::{ParquetSink, TraceSink};
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

impl Pool {
    /// As `--pool` and the provenance's pooling name it: "mean" or "none".
    pub fn name(self) -> &'static str {
        match self {
            Pool::Mean => "mean",
            Pool::None => "none",
        }
    }
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
    /// What to declare of the traces' provenance (model, revision, capture); the capture adds
    /// the pooling and the dtype the model computed each site in
    /// ([`actwatch_core::Provenance`]).
    pub provenance: Provenance,
}

/// The capture path `capture` declares: hidden states as the model's forward returns them.
pub const CAPTURE_PATH: &str = "actwatch capture:hidden_states";

/// The provenance `capture` declares for the model at `path`: `name` (default: the file's name),
/// `revision` (default: "sha256:" and the first 16 hex digits of the file's SHA-256, so two
/// different weight files never pass for one) and [`CAPTURE_PATH`]. [`capture`] adds the pooling
/// and each site's dtype.
pub fn model_provenance(
    path: &Path,
    name: Option<&str>,
    revision: Option<&str>,
) -> Result<Provenance> {
    let revision = match revision {
        Some(r) => r.to_string(),
        None => {
            use sha2::{Digest, Sha256};
            let io = |e: std::io::Error| Error::model(path, format!("cannot read it: {e}"));
            let mut hasher = Sha256::new();
            std::io::copy(&mut std::fs::File::open(path).map_err(io)?, &mut hasher).map_err(io)?;
            let hex: String = hasher.finalize()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("sha256:{hex}")
        }
    };
    let name = name.map_or_else(
        || {
            path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        },
        str::to_string,
    );
    let p = Provenance {
        model: Some(name),
        revision: Some(revision),
        capture: Some(CAPTURE_PATH.to_string()),
        ..Provenance::default()
    };
    p.validate()
        .map_err(|e| Error::InvalidOption(format!("--model-name / --model-revision: {e}")))?;
    Ok(p)
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
                let provenance = Provenance {
                    pooling: Some(options.pool.name().to_string()),
                    dtype: traces.kind.map(kind_name),
                    ..options.provenance.clone()
                };
                sink.write(
                    SiteBatch::new(
                        site.to_string(),
                        traces.ids,
                        traces.positions,
                        Vectors::new(traces.dim, traces.values)?,
                    )?
                    .with_provenance(Some(Arc::new(provenance))),
                )?;
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
    /// The dtype of the hidden states (the model's compute dtype at this site).
    kind: Option<Kind>,
}

/// A dtype as torch names it ("float32", "bfloat16", ...).
fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "float32".into(),
        Kind::Double => "float64".into(),
        Kind::Half => "float16".into(),
        Kind::BFloat16 => "bfloat16".into(),
        other => format!("{other:?}").to_lowercase(),
    }
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
    let mut kinds: Vec<Option<Kind>> = vec![None; options.sites.len()];
    for batch in order.chunks(options.batch_size) {
        let (ids_t, mask_t, t) = padded_inputs(model, w, batch)?;
        let lo = first + *batch.iter().min().expect("a batch has rows") as u64;
        let hi = first + *batch.iter().max().expect("a batch has rows") as u64;
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
            kinds[k] = Some(h.kind());
            match options.pool {
                Pool::Mean => {
                    let pooled = mean_pool(h, &mask_t)?;
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
        .zip(kinds)
        .map(|((per_row, dim), kind)| SiteTraces {
            kind,
            ..site_traces(w, per_row, dim, options.pool)
        })
        .collect())
}

/// The rows `batch` of a window, right-padded to the longest: token ids, attention mask (both
/// `[b, t]` on the model's device) and `t`.
fn padded_inputs(model: &Model, w: &Window, batch: &[usize]) -> Result<(Tensor, Tensor, usize)> {
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
    Ok((ids_t, mask_t, t))
}

/// The attention-mask weighted mean over tokens of hidden states `h` (`[b, t, d]`), on the host,
/// row-major `[b, d]`.
fn mean_pool(h: &Tensor, mask: &Tensor) -> Result<Vec<f32>> {
    let m = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
    let sum = h
        .f_mul(&m)?
        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?;
    let count = m
        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?
        .f_clamp_min(1e-9)?;
    to_host_f32(&sum.f_div(&count)?)
}

/// One site's traces of a window in input order, from its per-row vectors (one pooled vector, or
/// one per unmasked token with its position).
fn site_traces(w: &Window, per_row: Vec<Vec<f32>>, dim: usize, pool: Pool) -> SiteTraces {
    let mut out = SiteTraces {
        ids: Vec::new(),
        positions: (pool == Pool::None).then(Vec::new),
        dim,
        values: Vec::new(),
        kind: None,
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
