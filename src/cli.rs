//! The command line's definitions (clap): every command and its arguments. Defaults point at the
//! library crates' named constants.

use std::path::PathBuf;

use actwatch_detect::monitor::{DEFAULT_CALIBRATION_FRACTION, DEFAULT_FPR, DEFAULT_SEED};
use actwatch_detect::spec::DEFAULT_DETECTORS;
use actwatch_io::reader::{ReadOptions, TraceColumns};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "actwatch",
    version,
    about = "Flag neural-network computations whose activations look unlike trusted data",
    long_about = "actwatch fits detectors (Gaussian/Mahalanobis, k-nearest-neighbour) on activation \
traces of trusted data, calibrates them so that a flag means a p-value at or below a target \
false-positive rate, and scores new traces per computation.\n\nInput is Parquet in long format: one \
row per trace with a computation id column, a site column and a vector column (FixedSizeList or List \
of float32/float16)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fit a monitor on trusted reference traces and write it to a directory.
    Fit(FitArgs),
    /// Score Parquet archives with a fitted monitor; write scores as Parquet.
    Score(ScoreArgs),
    /// Evaluate a monitor: normal files against anomalous files (AUROC, FPR, recall).
    Eval(EvalArgs),
    /// A first run: fit and evaluate on a small sample of real transformer activations shipped with actwatch.
    Demo,
    /// Serve the gRPC API (actwatch.v1, with health and reflection) over one data directory.
    Serve(ServeArgs),
    /// Make a bearer token for `actwatch serve`: prints the token (for the client) and the
    /// `[[tokens]]` entry holding its SHA-256 (for the server's config file).
    Token(TokenArgs),
    /// Run a TorchScript model over token ids from Parquet and write its hidden states as traces
    /// (needs the `torch` feature).
    #[cfg(feature = "torch")]
    #[command(long_about = crate::torch::CAPTURE_HELP)]
    Capture(crate::torch::CaptureArgs),
}

/// Each setting is taken from, highest precedence first: its flag, its environment variable, the
/// `--config` file, the default.
#[derive(Args, Debug)]
#[command(
    after_long_help = "Logs go to stderr, filtered by RUST_LOG (default: info), e.g. RUST_LOG=actwatch_server=debug.\n\nMetrics (Prometheus text format 0.0.4, GET /metrics): actwatch_ingest_rows_total, actwatch_ingest_bytes_total, actwatch_scored_traces_total, actwatch_scored_computations_total, actwatch_flags_total, actwatch_observed_flag_rate, actwatch_target_fpr (label monitor); actwatch_score_latency_seconds (histogram, label rpc); actwatch_rejected_calls_total (label code)."
)]
pub struct ServeArgs {
    /// TOML config file. Keys: data_dir, listen, metrics_listen, allow_insecure,
    /// compute_linger_ms; a [tls] table
    /// (cert, key, client_ca); [[tokens]] entries (name, role = "read" | "admin", sha256: see
    /// `actwatch token`); and a [limits] table with any of
    /// max_message_bytes, max_batch_rows, max_vector_width, max_sites_per_monitor,
    /// max_ingests_per_monitor, max_site_name_bytes, max_trace_id_bytes, max_concurrent_streams,
    /// max_streams_per_client, max_connections, handshake_timeout_seconds,
    /// max_connection_age_seconds, max_fit_bytes, max_concurrent_fits,
    /// max_open_computations, max_joint_pending_bytes, max_score_log_bytes, flag_buffer,
    /// shutdown_grace_seconds, query_limit, max_query_limit. An unknown key is an error.
    /// Environment variables and flags override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding every monitor: reference segments, fitted artifacts, score logs
    /// [default: ./actwatch-data].
    #[arg(long, env = "ACTWATCH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the gRPC API listens on [default: 127.0.0.1:50051].
    #[arg(long, env = "ACTWATCH_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the Prometheus endpoint (GET /metrics), or `off` [default: 127.0.0.1:9464].
    #[arg(long, env = "ACTWATCH_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,
    /// PEM certificate chain: serve over TLS (with --tls-key).
    #[arg(
        long,
        env = "ACTWATCH_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "ACTWATCH_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed (mutual TLS; needs --tls-cert).
    #[arg(long, env = "ACTWATCH_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Listen beyond loopback without TLS or without tokens (logged as a warning). Without it,
    /// such an address is refused at start.
    #[arg(long)]
    pub allow_insecure: bool,
    /// Milliseconds the compute pool's threads keep polling for the next call after each one
    /// before they sleep, so that the calls of an active stream find them awake (a thread woken
    /// from sleep can take milliseconds on a VM); polling costs CPU only inside that window.
    /// 0 turns it off; at most 1000 [default: 1].
    #[arg(long, env = "ACTWATCH_COMPUTE_LINGER_MS", value_name = "MS")]
    pub compute_linger_ms: Option<u64>,
}

#[derive(Args, Clone)]
pub struct ColumnArgs {
    /// Column holding the computation id (all traces of one forward pass or request share it).
    /// Default for `fit`: trace_id; for `score`/`eval`: what the monitor was fitted with.
    #[arg(long)]
    pub trace_column: Option<String>,
    /// Column naming the site (layer, hook point) a trace was read at; strings or integers.
    /// Default for `fit`: site; for `score`/`eval`: what the monitor was fitted with.
    #[arg(long)]
    pub site_column: Option<String>,
    /// Column holding the activation vector (FixedSizeList, List or LargeList of float32/float16/float64).
    /// Default for `fit`: activation; for `score`/`eval`: what the monitor was fitted with.
    #[arg(long)]
    pub vector_column: Option<String>,
    /// Rows decoded per batch; bounds memory while streaming (scoring holds about three batches
    /// at once: one read ahead, one being scored, one being added to its computations).
    #[arg(long, default_value_t = actwatch_io::reader::DEFAULT_BATCH_ROWS)]
    pub batch_rows: usize,
}

impl ColumnArgs {
    pub fn read_options(&self, defaults: &TraceColumns, sites: Option<Vec<String>>) -> ReadOptions {
        ReadOptions {
            columns: TraceColumns {
                trace: self
                    .trace_column
                    .clone()
                    .unwrap_or_else(|| defaults.trace.clone()),
                site: self
                    .site_column
                    .clone()
                    .unwrap_or_else(|| defaults.site.clone()),
                vector: self
                    .vector_column
                    .clone()
                    .unwrap_or_else(|| defaults.vector.clone()),
            },
            batch_rows: self.batch_rows.max(1),
            sites,
            keep_other_columns: false,
        }
    }
}

#[derive(Args)]
pub struct FitArgs {
    /// Reference Parquet files or directories (searched recursively for *.parquet).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Directory to write the monitor to (replaced atomically if it already holds a monitor).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Only these sites (comma-separated); default: every site in the input.
    #[arg(long, value_delimiter = ',')]
    pub sites: Option<Vec<String>>,
    /// Detectors fitted at every site, comma-separated, each `name[:key=value,...]`:
    /// `gaussian` (Mahalanobis; shrinkage=lw|oas|<0..1>, normalize=true|false, rank=<r>|full) and
    /// `knn` (k=<k>, metric=cosine|l2, exact_max=<n> references before switching to HNSW,
    /// max_references=<n> kept as a seeded uniform sample, m, ef_construction, ef_search).
    #[arg(long, default_value = DEFAULT_DETECTORS)]
    pub detectors: String,
    /// Detectors fitted on the joint vector of a computation (its sites' vectors, each
    /// L2-normalised, concatenated, one per position with a trace at every site), as for
    /// --detectors, or `none`. Above 4096 in total, each site enters by its top whitened principal
    /// coordinates under its own Gaussian (min(rank, 4096 / sites)). Skipped, and said so, with
    /// one site, or above 4096 when a site has no Gaussian detector.
    #[arg(long, default_value = actwatch_detect::spec::DEFAULT_JOINT)]
    pub joint: String,
    /// How a computation's traces at one (site, detector) aggregate before fusion (per-token
    /// traces): max (the most anomalous trace), mean, ema:ALPHA (peak of the exponentially
    /// smoothed score), max_rolling_mean:WINDOW (peak mean over WINDOW consecutive traces),
    /// topk_mean:K. Calibrated at computation level whichever is chosen.
    #[arg(long, default_value_t = actwatch_detect::aggregate::DEFAULT_AGGREGATION.to_string())]
    pub aggregation: String,
    /// Length strata of the computation-level calibration: quantile groups of the calibration
    /// computations' token counts, each calibrated on its own (Mondrian), so the false-positive
    /// rate holds for short and long computations alike; 1 for one calibration. Pooled traces
    /// (one per site) always get one.
    #[arg(long, default_value_t = actwatch_detect::monitor::DEFAULT_LENGTH_STRATA)]
    pub length_strata: usize,
    /// How per-detector, per-site p-values combine into one statistic per computation:
    /// fisher (sum of evidence), cauchy (Cauchy combination), minp (strongest single signal).
    #[arg(long, default_value_t = actwatch_detect::fusion::DEFAULT_FUSION.name().to_string())]
    pub fusion: String,
    /// Target false-positive rate: a computation is flagged when its p-value is at or below it.
    #[arg(long, default_value_t = DEFAULT_FPR)]
    pub fpr: f64,
    /// Share of reference computations held out (by seeded hash of the id) to calibrate p-values.
    #[arg(long, default_value_t = DEFAULT_CALIBRATION_FRACTION)]
    pub calibration_fraction: f64,
    /// Seed of the fit/calibration split.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Concept probes to fit from --examples, each `NAME[:key=value,...]` (repeat the flag for
    /// several): kind=diff_means (default)|logistic, c=auto|<C> (logistic: inverse L2 strength, auto =
    /// 5-fold cross-validated), sites=<site>+<site>... (default: every site, fused),
    /// aggregation=<as --aggregation>, reference_negatives=true|false (also fit on the
    /// reference traffic as negatives), defer_fpr=<rate> (a cascade's deferral band). A probe's
    /// p-value is calibrated among benign computations (the calibration part of the reference
    /// traffic and of the labelled negatives).
    #[arg(long = "probe", requires = "examples")]
    pub probes: Vec<String>,
    /// Labelled examples for --probe: Parquet files or directories in the same long format as
    /// --input (same columns), with a label column (--label-column).
    #[arg(long, num_args = 1.., requires = "probes")]
    pub examples: Vec<PathBuf>,
    /// The examples' label column: boolean, or an integer 0 (concept absent) or 1 (present);
    /// one label per computation.
    #[arg(long, default_value = "label")]
    pub label_column: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LevelArg {
    /// One row per computation (trace id): fused score, p-value, flag, per-site/detector p-values.
    Computation,
    /// One row per input trace: the input columns (except the vector) plus trace-level scores.
    Trace,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Monitor directory written by `actwatch fit`.
    #[arg(long)]
    pub monitor: PathBuf,
    /// Parquet files or directories to score.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output Parquet file; it appears only once complete.
    #[arg(long)]
    pub output: PathBuf,
    /// Granularity of the output.
    #[arg(long, value_enum, default_value = "computation")]
    pub level: LevelArg,
    #[command(flatten)]
    pub columns: ColumnArgs,
    #[command(flatten)]
    pub provenance: ProvenanceArgs,
    /// Compute raw Gaussian and exact kNN scores with libtorch on this device (cpu, cuda, cuda:N)
    /// instead of the default pure-Rust backend; calibration and fusion are unchanged.
    #[cfg(feature = "torch")]
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// The detector families `--device` takes: `gaussian`, `knn` or both (default both; the rest
    /// stay on the default backend). On a GPU exact kNN gains most, and a low-rank Gaussian can be
    /// faster on the host (docs/benchmarks-gpu.md).
    #[cfg(feature = "torch")]
    #[arg(long, value_name = "FAMILIES", requires = "device")]
    pub on_device: Option<String>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Monitor directory written by `actwatch fit`.
    #[arg(long)]
    pub monitor: PathBuf,
    /// Parquet files of in-distribution computations (false positives are measured on them).
    #[arg(long, required_unless_present = "examples", num_args = 1..)]
    pub normal: Vec<PathBuf>,
    /// Parquet files of anomalous computations; each file is one category unless --label-column is given.
    #[arg(long, required_unless_present = "examples", num_args = 1..)]
    pub anomalous: Vec<PathBuf>,
    /// With --normal/--anomalous: group anomalous computations by this column's value instead
    /// of by file. With --examples: the concept label (boolean, or an integer 0 or 1).
    #[arg(long)]
    pub label_column: Option<String>,
    /// Evaluate the monitor's concept probes instead: labelled Parquet files (the label in
    /// --label-column); per probe AUROC, recall and FPR at the target rate, deferred shares.
    #[arg(long, num_args = 1.., conflicts_with_all = ["normal", "anomalous"], requires = "label_column")]
    pub examples: Vec<PathBuf>,
    /// With --examples: also report per value of this column (e.g. the examples' source).
    #[arg(long, requires = "examples")]
    pub group_column: Option<String>,
    /// Write score histograms and ROC curves to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub columns: ColumnArgs,
    #[command(flatten)]
    pub provenance: ProvenanceArgs,
}

/// What scoring does with input whose declared provenance (its Parquet metadata
/// `actwatch.provenance`) conflicts with what the monitor's reference traces declared.
#[derive(Args)]
pub struct ProvenanceArgs {
    /// refuse: stop with an error naming the site and field (the monitor's calibration does not
    /// hold for vectors read another way); warn: score anyway and print the conflicts.
    #[arg(long, value_enum, default_value = "refuse")]
    pub provenance_policy: ProvenancePolicyArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProvenancePolicyArg {
    Refuse,
    Warn,
}

impl ProvenanceArgs {
    pub fn policy(&self) -> actwatch_detect::monitor::ProvenancePolicy {
        use actwatch_detect::monitor::ProvenancePolicy;
        match self.provenance_policy {
            ProvenancePolicyArg::Refuse => ProvenancePolicy::Refuse,
            ProvenancePolicyArg::Warn => ProvenancePolicy::Warn,
        }
    }
}

/// `actwatch token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Who will hold the token (logged with its calls).
    #[arg(long)]
    pub name: String,
    /// What it may do: read (query and score) or admin (also create, delete, ingest, fit).
    #[arg(long, value_parser = ["read", "admin"])]
    pub role: String,
}
