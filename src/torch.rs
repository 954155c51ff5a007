//! The `torch` feature's commands: `actwatch capture`, and `--device` on `score`.

use std::path::PathBuf;

use actwatch_detect::Monitor;
use actwatch_torch::capture::{
    self, CaptureOptions, InputColumns, Model, OutputColumns, ParquetSink, Pool,
};
use actwatch_torch::ingest::ServerSink;
use actwatch_torch::{parse_device, Families, TorchBackend};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

pub const CAPTURE_HELP: &str = "Run a TorchScript model over token ids read from Parquet and write \
the hidden states it returns as traces in actwatch's long format (to --output, or straight into a \
server's monitor with --server and --monitor).

The model contract: forward(input_ids: int64[B, T], attention_mask: int64[B, T]) returns the hidden \
states as a tuple (or list) of float tensors [B, T, d]: element 0 the embeddings' output, element L \
the output of block L (Hugging Face's output_hidden_states order). Sequences are right-padded with \
id 0 and mask 0. scripts/export_minilm.py exports all-MiniLM-L6-v2 this way.

The inputs: Parquet with an id column (string or integer), input_ids (list<int64>, one unpadded \
sequence per row, e.g. [CLS] ... [SEP]) and optionally attention_mask (list<int64>, same lengths, \
0 or 1; default all ones). `scripts/export_minilm.py tokenize` writes such a file from texts.

The output: one row per (sequence, site) with --pool mean (attention-mask weighted mean over \
tokens, special tokens included), or per (token, site) with --pool none plus a position column; \
columns trace_id (the input id), site (the hidden-state index, as a string), activation \
(FixedSizeList<float32>[d]), each renamable. The file appears only when complete; a capture that \
fails stores nothing on the server either.";

#[derive(Clone, Copy, ValueEnum)]
pub enum PoolArg {
    /// One trace per sequence and site: the attention-mask weighted mean over tokens.
    Mean,
    /// One trace per token and site, with its position.
    None,
}

#[derive(Args)]
pub struct CaptureArgs {
    /// TorchScript file (torch.jit.save) following the contract above.
    #[arg(long)]
    model: PathBuf,
    /// Inputs Parquet files (id, input_ids, optional attention_mask).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Hidden-state indices to capture, comma-separated (0 = embeddings, L = block L).
    #[arg(long, required = true, value_delimiter = ',')]
    sites: Vec<usize>,
    /// Output Parquet file (long format).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    output: Option<PathBuf>,
    /// Stream the traces into a running server instead (host:port), as reference traffic
    /// (IngestReference) of --monitor; acknowledged only when the capture completes.
    #[arg(long, requires = "monitor", value_name = "ADDR")]
    server: Option<String>,
    /// The server's monitor to ingest into (it must exist).
    #[arg(long, requires = "server")]
    monitor: Option<String>,
    /// The model's name in the traces' provenance (default: the model file's name).
    #[arg(long)]
    model_name: Option<String>,
    /// The weights' revision in the traces' provenance (default: sha256: and the first 16 hex
    /// digits of the model file's SHA-256).
    #[arg(long)]
    model_revision: Option<String>,
    /// Mean-pool each sequence, or keep every token.
    #[arg(long, value_enum, default_value = "mean")]
    pool: PoolArg,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = capture::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Input column with the sequence id.
    #[arg(long, default_value = capture::DEFAULT_ID_COLUMN)]
    id_column: String,
    /// Input column with the token ids.
    #[arg(long, default_value = capture::DEFAULT_INPUT_IDS_COLUMN)]
    input_ids_column: String,
    /// Input column with the attention mask (used when present).
    #[arg(long, default_value = capture::DEFAULT_ATTENTION_MASK_COLUMN)]
    attention_mask_column: String,
    /// Output column names: computation id, site, vector, token position (--pool none).
    #[arg(long, default_value = actwatch_io::reader::DEFAULT_TRACE_COLUMN)]
    trace_column: String,
    #[arg(long, default_value = actwatch_io::reader::DEFAULT_SITE_COLUMN)]
    site_column: String,
    #[arg(long, default_value = actwatch_io::reader::DEFAULT_VECTOR_COLUMN)]
    vector_column: String,
    #[arg(long, default_value = "position")]
    position_column: String,
}

pub fn capture(a: CaptureArgs) -> Result<()> {
    let device = parse_device(&a.device).context("--device")?;
    if a.sites.is_empty() {
        bail!("--sites: name at least one hidden-state index");
    }
    let pool = match a.pool {
        PoolArg::Mean => Pool::Mean,
        PoolArg::None => Pool::None,
    };
    let model = Model::load(&a.model, device)?;
    let provenance = capture::model_provenance(
        &a.model,
        a.model_name.as_deref(),
        a.model_revision.as_deref(),
    )?;
    let options = CaptureOptions {
        provenance,
        sites: a.sites.clone(),
        pool,
        batch_size: a.batch_size,
        columns: InputColumns {
            id: a.id_column.clone(),
            input_ids: a.input_ids_column.clone(),
            attention_mask: a.attention_mask_column.clone(),
        },
    };
    let files = actwatch_io::reader::expand_inputs(&a.input)?;
    let summary = match (&a.output, &a.server, &a.monitor) {
        (Some(out), None, None) => {
            let columns = OutputColumns {
                trace: a.trace_column.clone(),
                site: a.site_column.clone(),
                vector: a.vector_column.clone(),
                position: a.position_column.clone(),
            };
            let mut sink = ParquetSink::new(out, columns, pool);
            let summary = capture::capture(&model, &files, &options, &mut sink, |_| {})?;
            sink.finish()?;
            println!("traces written to {}", out.display());
            summary
        }
        (None, Some(server), Some(monitor)) => {
            let mut sink = ServerSink::connect(server, monitor)?;
            let summary = capture::capture(&model, &files, &options, &mut sink, |_| {})?;
            let ack = sink.finish()?;
            println!(
                "ingested into {monitor} at {server}: {} rows in {} batches ({} reference rows stored)",
                ack.rows, ack.batches, ack.total_rows
            );
            summary
        }
        _ => bail!("give --output, or --server with --monitor"),
    };
    println!(
        "captured {} sequences ({} tokens) -> {} traces in {:.2}s ({:.1} sequences/s; model {:.2}s on {})",
        summary.sequences,
        summary.tokens,
        summary.traces,
        summary.seconds,
        summary.sequences as f64 / summary.seconds.max(1e-9),
        summary.model_seconds,
        a.device
    );
    Ok(())
}

/// With `--device`, makes `monitor` compute raw scores with libtorch there, for the detector
/// families of `--on-device` (default both).
pub fn with_device(
    mut monitor: Monitor,
    device: Option<&str>,
    on_device: Option<&str>,
) -> Result<Monitor> {
    if let Some(name) = device {
        let device = parse_device(name).context("--device")?;
        let families = match on_device {
            Some(list) => Families::parse(list).context("--on-device")?,
            None => Families::ALL,
        };
        let (on, back) = TorchBackend::attach(&mut monitor, device, families)?;
        eprintln!(
            "scoring with {}: {on} detector(s) on the device{}",
            monitor.backend().name(),
            if back > 0 {
                format!(", {back} (HNSW kNN, or left out by --on-device) on the default backend")
            } else {
                String::new()
            }
        );
    }
    Ok(monitor)
}
