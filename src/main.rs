//! `actwatch`: the command line. Parses arguments, then calls the library crates; no logic of its own
//! beyond formatting reports.

mod plot;
#[cfg(feature = "torch")]
mod torch;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use actwatch_detect::metrics;
use actwatch_detect::monitor::{
    Monitor, MonitorOptions, DEFAULT_CALIBRATION_FRACTION, DEFAULT_FPR, DEFAULT_SEED,
};
use actwatch_detect::spec::{DetectorSpec, DEFAULT_DETECTORS};
use actwatch_detect::Fusion;
use actwatch_io::artifact::{load_monitor, save_monitor, Manifest};
use actwatch_io::pipeline::{self, Level, Progress};
use actwatch_io::reader::{ReadOptions, TraceColumns};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Run a TorchScript model over token ids from Parquet and write its hidden states as traces
    /// (needs the `torch` feature).
    #[cfg(feature = "torch")]
    #[command(long_about = torch::CAPTURE_HELP)]
    Capture(torch::CaptureArgs),
}

/// `actwatch serve` defaults, below the config file, the environment and the flags.
const DEFAULT_DATA_DIR: &str = "./actwatch-data";
const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// The `--metrics-listen` value that disables the metrics endpoint.
const METRICS_OFF: &str = "off";

/// Each setting is taken from, highest precedence first: its flag, its environment variable, the
/// `--config` file, the default.
#[derive(Args, Debug)]
#[command(
    after_long_help = "Logs go to stderr, filtered by RUST_LOG (default: info), e.g. RUST_LOG=actwatch_server=debug.\n\nMetrics (Prometheus text format 0.0.4, GET /metrics): actwatch_ingest_rows_total, actwatch_ingest_bytes_total, actwatch_scored_traces_total, actwatch_scored_computations_total, actwatch_flags_total, actwatch_observed_flag_rate, actwatch_target_fpr (label monitor); actwatch_score_latency_seconds (histogram, label rpc); actwatch_rejected_calls_total (label code)."
)]
struct ServeArgs {
    /// TOML config file. Keys: data_dir, listen, metrics_listen, and a [limits] table with any of
    /// max_message_bytes, max_batch_rows, max_concurrent_streams, max_open_computations,
    /// max_score_log_bytes, flag_buffer, query_limit, max_query_limit. An unknown key is an error.
    /// Environment variables and flags override the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding every monitor: reference segments, fitted artifacts, score logs
    /// [default: ./actwatch-data].
    #[arg(long, env = "ACTWATCH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address the gRPC API listens on [default: 127.0.0.1:50051].
    #[arg(long, env = "ACTWATCH_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Address of the Prometheus endpoint (GET /metrics), or `off` [default: 127.0.0.1:9464].
    #[arg(long, env = "ACTWATCH_METRICS_LISTEN", value_name = "ADDR|off")]
    metrics_listen: Option<String>,
}

/// The `--config` file. Every key is optional; unknown keys are refused, naming the key.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    limits: LimitsFile,
}

/// The `[limits]` table: the fields of `actwatch_server::Limits`, each optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_message_bytes: Option<usize>,
    max_batch_rows: Option<usize>,
    max_concurrent_streams: Option<usize>,
    max_open_computations: Option<usize>,
    max_score_log_bytes: Option<u64>,
    flag_buffer: Option<usize>,
    query_limit: Option<usize>,
    max_query_limit: Option<usize>,
}

impl LimitsFile {
    fn apply(self, mut l: actwatch_server::Limits) -> actwatch_server::Limits {
        let LimitsFile {
            max_message_bytes,
            max_batch_rows,
            max_concurrent_streams,
            max_open_computations,
            max_score_log_bytes,
            flag_buffer,
            query_limit,
            max_query_limit,
        } = self;
        l.max_message_bytes = max_message_bytes.unwrap_or(l.max_message_bytes);
        l.max_batch_rows = max_batch_rows.unwrap_or(l.max_batch_rows);
        l.max_concurrent_streams = max_concurrent_streams.unwrap_or(l.max_concurrent_streams);
        l.max_open_computations = max_open_computations.unwrap_or(l.max_open_computations);
        l.max_score_log_bytes = max_score_log_bytes.unwrap_or(l.max_score_log_bytes);
        l.flag_buffer = flag_buffer.unwrap_or(l.flag_buffer);
        l.query_limit = query_limit.unwrap_or(l.query_limit);
        l.max_query_limit = max_query_limit.unwrap_or(l.max_query_limit);
        l
    }
}

/// What `actwatch serve` runs with, every layer applied.
#[derive(Debug, PartialEq)]
struct ServeConfig {
    data_dir: PathBuf,
    listen: String,
    /// `None`: no metrics endpoint.
    metrics_listen: Option<String>,
    limits: actwatch_server::Limits,
}

impl ServeConfig {
    /// Reads the `--config` file (if any) and layers it under `a` (flags, then environment).
    fn resolve(a: ServeArgs) -> Result<Self> {
        let file = match &a.config {
            None => ConfigFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
        };
        Ok(Self::layer(a, file))
    }

    fn layer(a: ServeArgs, file: ConfigFile) -> Self {
        let metrics = a
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
        Self {
            data_dir: a
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            listen: a
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.into()),
            metrics_listen: (!metrics.eq_ignore_ascii_case(METRICS_OFF)).then_some(metrics),
            limits: file.limits.apply(actwatch_server::Limits::default()),
        }
    }
}

#[derive(Args, Clone)]
struct ColumnArgs {
    /// Column holding the computation id (all traces of one forward pass or request share it).
    /// Default for `fit`: trace_id; for `score`/`eval`: what the monitor was fitted with.
    #[arg(long)]
    trace_column: Option<String>,
    /// Column naming the site (layer, hook point) a trace was read at; strings or integers.
    /// Default for `fit`: site; for `score`/`eval`: what the monitor was fitted with.
    #[arg(long)]
    site_column: Option<String>,
    /// Column holding the activation vector (FixedSizeList, List or LargeList of float32/float16/float64).
    /// Default for `fit`: activation; for `score`/`eval`: what the monitor was fitted with.
    #[arg(long)]
    vector_column: Option<String>,
    /// Rows decoded per batch; bounds memory while streaming.
    #[arg(long, default_value_t = actwatch_io::reader::DEFAULT_BATCH_ROWS)]
    batch_rows: usize,
}

impl ColumnArgs {
    fn read_options(&self, defaults: &TraceColumns, sites: Option<Vec<String>>) -> ReadOptions {
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
struct FitArgs {
    /// Reference Parquet files or directories (searched recursively for *.parquet).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Directory to write the monitor to (replaced atomically if it already holds a monitor).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Only these sites (comma-separated); default: every site in the input.
    #[arg(long, value_delimiter = ',')]
    sites: Option<Vec<String>>,
    /// Detectors fitted at every site, comma-separated, each `name[:key=value,...]`:
    /// `gaussian` (Mahalanobis; shrinkage=lw|oas|<0..1>, normalize=true|false, rank=<r>|full) and
    /// `knn` (k=<k>, metric=cosine|l2, exact_max=<n> references before switching to HNSW,
    /// max_references=<n> kept as a seeded uniform sample, m, ef_construction, ef_search).
    #[arg(long, default_value = DEFAULT_DETECTORS)]
    detectors: String,
    /// How per-detector, per-site p-values combine into one statistic per computation:
    /// fisher (sum of evidence), cauchy (Cauchy combination), minp (strongest single signal).
    #[arg(long, default_value_t = actwatch_detect::fusion::DEFAULT_FUSION.name().to_string())]
    fusion: String,
    /// Target false-positive rate: a computation is flagged when its p-value is at or below it.
    #[arg(long, default_value_t = DEFAULT_FPR)]
    fpr: f64,
    /// Share of reference computations held out (by seeded hash of the id) to calibrate p-values.
    #[arg(long, default_value_t = DEFAULT_CALIBRATION_FRACTION)]
    calibration_fraction: f64,
    /// Seed of the fit/calibration split.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum LevelArg {
    /// One row per computation (trace id): fused score, p-value, flag, per-site/detector p-values.
    Computation,
    /// One row per input trace: the input columns (except the vector) plus trace-level scores.
    Trace,
}

#[derive(Args)]
struct ScoreArgs {
    /// Monitor directory written by `actwatch fit`.
    #[arg(long)]
    monitor: PathBuf,
    /// Parquet files or directories to score.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output Parquet file; it appears only once complete.
    #[arg(long)]
    output: PathBuf,
    /// Granularity of the output.
    #[arg(long, value_enum, default_value = "computation")]
    level: LevelArg,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Compute raw Gaussian and exact kNN scores with libtorch on this device (cpu, cuda, cuda:N)
    /// instead of the default pure-Rust backend; calibration and fusion are unchanged.
    #[cfg(feature = "torch")]
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

#[derive(Args)]
struct EvalArgs {
    /// Monitor directory written by `actwatch fit`.
    #[arg(long)]
    monitor: PathBuf,
    /// Parquet files of in-distribution computations (false positives are measured on them).
    #[arg(long, required = true, num_args = 1..)]
    normal: Vec<PathBuf>,
    /// Parquet files of anomalous computations; each file is one category unless --label-column is given.
    #[arg(long, required = true, num_args = 1..)]
    anomalous: Vec<PathBuf>,
    /// Group anomalous computations by this column's value instead of by file.
    #[arg(long)]
    label_column: Option<String>,
    /// Write score histograms and ROC curves to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    columns: ColumnArgs,
}

/// Draws an indicatif bar per phase (hidden when stderr is not a terminal).
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: &str, total_rows: u64) {
        let bar = ProgressBar::new(total_rows).with_message(phase.to_string());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        *self.bar.lock().expect("progress lock") = Some(bar);
    }

    fn advance(&self, rows: u64) {
        if let Some(b) = self.bar.lock().expect("progress lock").as_ref() {
            b.inc(rows);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("progress lock").take() {
            b.finish_and_clear();
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Fit(a) => fit(a),
        Command::Score(a) => score(a),
        Command::Eval(a) => eval(a),
        Command::Demo => demo(),
        Command::Serve(a) => serve(a),
        #[cfg(feature = "torch")]
        Command::Capture(a) => torch::capture(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs the server until SIGINT or SIGTERM, then lets in-flight calls finish.
fn serve(a: ServeArgs) -> Result<()> {
    let config = ServeConfig::resolve(a)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics_listener = match &config.metrics_listen {
            None => None,
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            ),
        };
        actwatch_server::serve_with_metrics(
            listener,
            metrics_listener,
            config.data_dir.clone(),
            config.limits.clone(),
            shutdown_signal(),
        )
        .await
        .with_context(|| format!("serving {}", config.data_dir.display()))?;
        Ok(())
    })
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn fit(a: FitArgs) -> Result<()> {
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list(&a.detectors).context("--detectors")?,
        fusion: Fusion::parse(&a.fusion).context("--fusion")?,
        fpr: a.fpr,
        calibration_fraction: a.calibration_fraction,
        seed: a.seed,
    };
    options.validate()?;
    let read = a
        .columns
        .read_options(&TraceColumns::default(), a.sites.clone());
    let started = Instant::now();
    let (monitor, reference) =
        pipeline::fit_monitor(&a.input, &read, options, &Bars::new()).context("fitting failed")?;
    let manifest = save_monitor(&monitor, &reference, &a.out)
        .with_context(|| format!("writing the monitor to {}", a.out.display()))?;
    print_fit_report(&monitor, &manifest, started.elapsed().as_secs_f64(), &a.out);
    Ok(())
}

fn print_fit_report(monitor: &Monitor, manifest: &Manifest, seconds: f64, out: &Path) {
    let s = &monitor.summary;
    println!("monitor written to {}", out.display());
    println!(
        "reference: {} rows, {} computations ({} calibration), sha256 {}",
        manifest.reference.rows,
        manifest.reference.computations,
        s.calibration_computations,
        &manifest.reference.sha256[..16]
    );
    println!(
        "{:<12} {:>6} {:>10} {:>12}  detectors",
        "site", "width", "fit", "calibration"
    );
    for site in &monitor.sites {
        let dets: Vec<String> = site.detectors.iter().map(describe_detector).collect();
        println!(
            "{:<12} {:>6} {:>10} {:>12}  {}",
            site.name,
            site.dim,
            site.fit_traces,
            site.calibration_traces,
            dets.join(", ")
        );
    }
    for r in &s.knn_recall {
        println!(
            "knn recall@{} at site {} (HNSW vs exact, {} calibration queries): {:.4}",
            r.k, r.site, r.queries, r.recall
        );
    }
    if s.knn_recall.is_empty() {
        println!("knn: exact search at every site (recall 1)");
    }
    println!(
        "fusion {}, target FPR {}, calibration FPR {:.4} (each calibration computation judged against the others)",
        monitor.options.fusion.name(),
        monitor.options.fpr,
        s.calibration_fpr
    );
    println!(
        "timings: fit {:.2}s, calibration {:.2}s, total {:.2}s",
        s.fit_seconds, s.calibration_seconds, seconds
    );
}

fn describe_detector(d: &actwatch_detect::spec::FittedDetector) -> String {
    use actwatch_detect::spec::FittedDetector;
    match d {
        FittedDetector::Gaussian(g) => format!(
            "gaussian(shrinkage {:.3}, rank {}{})",
            g.shrinkage(),
            g.rank(),
            if g.options().normalize { ", l2" } else { "" }
        ),
        FittedDetector::Knn(k) => format!(
            "knn(k {}, {:?}, {} refs, {})",
            k.options().k,
            k.options().metric,
            k.len(),
            if k.is_exact() { "exact" } else { "hnsw" }
        ),
    }
}

fn load(dir: &Path) -> Result<(Monitor, Manifest)> {
    load_monitor(dir).with_context(|| format!("loading the monitor at {}", dir.display()))
}

fn score(a: ScoreArgs) -> Result<()> {
    let (monitor, manifest) = load(&a.monitor)?;
    #[cfg(feature = "torch")]
    let monitor = torch::with_device(monitor, a.device.as_deref())?;
    let read = a.columns.read_options(&manifest.reference.columns, None);
    let level = match a.level {
        LevelArg::Computation => Level::Computation,
        LevelArg::Trace => Level::Trace,
    };
    let started = Instant::now();
    let summary =
        pipeline::score_to_parquet(&monitor, &a.input, &read, level, &a.output, &Bars::new())
            .context("scoring failed")?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "scored {} traces into {} rows ({} flagged at p <= {}) in {:.2}s ({:.0} traces/s); wrote {}",
        summary.input_rows,
        summary.output_rows,
        summary.flagged,
        monitor.options.fpr,
        secs,
        summary.input_rows as f64 / secs.max(1e-9),
        a.output.display()
    );
    Ok(())
}

/// One row of the evaluation table.
struct EvalRow {
    name: String,
    scores: Vec<f64>,
    flags: Vec<bool>,
}

fn eval(a: EvalArgs) -> Result<()> {
    let (monitor, manifest) = load(&a.monitor)?;
    let read = a.columns.read_options(&manifest.reference.columns, None);
    run_eval(
        &monitor,
        &read,
        &a.normal,
        &a.anomalous,
        a.label_column.as_deref(),
        a.plot.as_deref(),
    )
}

fn run_eval(
    monitor: &Monitor,
    read: &ReadOptions,
    normal: &[PathBuf],
    anomalous: &[PathBuf],
    label_column: Option<&str>,
    plot_path: Option<&Path>,
) -> Result<()> {
    let bars = Bars::new();
    let n = pipeline::score_computations(monitor, normal, read, &bars)
        .context("scoring the normal files")?;
    let normal_row = EvalRow {
        name: "normal".into(),
        scores: n.results.iter().map(|r| r.score).collect(),
        flags: n.results.iter().map(|r| r.flagged).collect(),
    };
    let mut rows: Vec<EvalRow> = Vec::new();
    for path in anomalous {
        let t = pipeline::score_computations(monitor, std::slice::from_ref(path), read, &bars)
            .with_context(|| format!("scoring {}", path.display()))?;
        match label_column {
            None => rows.push(EvalRow {
                name: path.file_stem().map_or_else(
                    || path.display().to_string(),
                    |s| s.to_string_lossy().into_owned(),
                ),
                scores: t.results.iter().map(|r| r.score).collect(),
                flags: t.results.iter().map(|r| r.flagged).collect(),
            }),
            Some(col) => {
                let labels = t.column_strings(col).with_context(|| {
                    format!(
                        "{}: no column {col} constant within each computation",
                        path.display()
                    )
                })?;
                for (label, r) in labels.iter().zip(&t.results) {
                    let name = label.clone().unwrap_or_else(|| "(null)".into());
                    let row = match rows.iter_mut().position(|x| x.name == name) {
                        Some(i) => &mut rows[i],
                        None => {
                            rows.push(EvalRow {
                                name,
                                scores: vec![],
                                flags: vec![],
                            });
                            rows.last_mut().expect("pushed")
                        }
                    };
                    row.scores.push(r.score);
                    row.flags.push(r.flagged);
                }
            }
        }
    }
    if normal_row.scores.is_empty() {
        bail!("the normal files hold no computations of the monitor's sites");
    }
    let fpr = metrics::rate(&normal_row.flags).unwrap_or(0.0);
    println!(
        "normal: {} computations, achieved FPR {:.4} at target {} ({} flagged)",
        normal_row.scores.len(),
        fpr,
        monitor.options.fpr,
        normal_row.flags.iter().filter(|&&f| f).count()
    );
    println!(
        "{:<24} {:>7} {:>8} {:>11} {:>16}",
        "anomalous", "n", "AUROC", "FPR@95TPR", "recall@target"
    );
    for r in &rows {
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "{:<24} {:>7} {:>8} {:>11} {:>16}",
            r.name,
            r.scores.len(),
            fmt(metrics::auroc(&normal_row.scores, &r.scores)),
            fmt(metrics::fpr_at_tpr(&normal_row.scores, &r.scores, 0.95)),
            fmt(metrics::rate(&r.flags)),
        );
    }
    if let Some(path) = plot_path {
        let series: Vec<(&str, &[f64])> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.scores.as_slice()))
            .collect();
        std::fs::write(
            path,
            plot::svg(&normal_row.scores, &series, monitor.summary.threshold),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// The demo sample: real all-MiniLM-L6-v2 activations (layers 2, 4, 6; float16), no text.
const DEMO_FILES: [(&str, &[u8]); 5] = [
    (
        "reference.parquet",
        include_bytes!("../data/demo/reference.parquet"),
    ),
    (
        "normal.parquet",
        include_bytes!("../data/demo/normal.parquet"),
    ),
    (
        "ood_code.parquet",
        include_bytes!("../data/demo/ood_code.parquet"),
    ),
    (
        "ood_non_english.parquet",
        include_bytes!("../data/demo/ood_non_english.parquet"),
    ),
    (
        "ood_base64.parquet",
        include_bytes!("../data/demo/ood_base64.parquet"),
    ),
];

fn demo() -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for (name, bytes) in DEMO_FILES {
        std::fs::write(dir.path().join(name), bytes)?;
    }
    println!(
        "actwatch demo: real activations of all-MiniLM-L6-v2 (layers 2, 4, 6) on trusted English prose,\n\
         and on out-of-distribution text (source code, other languages, base64). Files in {}\n",
        dir.path().display()
    );
    let columns = TraceColumns {
        trace: "id".into(),
        site: "layer".into(),
        vector: "activation".into(),
    };
    let read = ReadOptions {
        columns,
        ..ReadOptions::default()
    };
    let monitor_dir = dir.path().join("monitor");
    println!("$ actwatch fit --input reference.parquet --out monitor --trace-column id --site-column layer");
    let started = Instant::now();
    let (monitor, reference) = pipeline::fit_monitor(
        &[dir.path().join("reference.parquet")],
        &read,
        MonitorOptions::default(),
        &Bars::new(),
    )?;
    let manifest = save_monitor(&monitor, &reference, &monitor_dir)?;
    print_fit_report(
        &monitor,
        &manifest,
        started.elapsed().as_secs_f64(),
        &monitor_dir,
    );
    println!(
        "\n$ actwatch eval --monitor monitor --normal normal.parquet --anomalous ood_*.parquet"
    );
    let (monitor, _) = load(&monitor_dir)?;
    let anomalous: Vec<PathBuf> = ["ood_code", "ood_non_english", "ood_base64"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.parquet")))
        .collect();
    run_eval(
        &monitor,
        &read,
        &[dir.path().join("normal.parquet")],
        &anomalous,
        None,
        None,
    )?;
    println!(
        "\nNext: `actwatch fit --help`, `actwatch score --help`, and the README's walk-through."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: [&str; 3] = [
        "ACTWATCH_DATA_DIR",
        "ACTWATCH_LISTEN",
        "ACTWATCH_METRICS_LISTEN",
    ];

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let argv = ["actwatch", "serve"].iter().chain(argv);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => a,
            _ => unreachable!("parsed `serve`"),
        }
    }

    /// The only test that touches the `ACTWATCH_*` variables, so tests running in parallel never
    /// see each other's environment.
    #[test]
    fn serve_settings_layer_defaults_then_file_then_env_then_flags() {
        for v in ENV {
            std::env::remove_var(v);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("actwatch.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1\"\nmetrics_listen = \"127.0.0.1:2\"\n\
             [limits]\nmax_batch_rows = 7\nmax_score_log_bytes = 1024\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();

        let defaults = ServeConfig::resolve(serve_args(&[])).unwrap();
        assert_eq!(
            defaults,
            ServeConfig {
                data_dir: DEFAULT_DATA_DIR.into(),
                listen: DEFAULT_LISTEN.into(),
                metrics_listen: Some(DEFAULT_METRICS_LISTEN.into()),
                limits: actwatch_server::Limits::default(),
            }
        );

        let from_file = ServeConfig::resolve(serve_args(&["--config", file])).unwrap();
        assert_eq!(from_file.data_dir, PathBuf::from("/from/file"));
        assert_eq!(from_file.listen, "127.0.0.1:1");
        assert_eq!(from_file.metrics_listen.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(
            from_file.limits,
            actwatch_server::Limits {
                max_batch_rows: 7,
                max_score_log_bytes: 1024,
                ..actwatch_server::Limits::default()
            }
        );

        std::env::set_var("ACTWATCH_LISTEN", "127.0.0.1:3");
        std::env::set_var("ACTWATCH_METRICS_LISTEN", "off");
        let env_over_file = ServeConfig::resolve(serve_args(&["--config", file])).unwrap();
        assert_eq!(env_over_file.data_dir, PathBuf::from("/from/file"));
        assert_eq!(env_over_file.listen, "127.0.0.1:3");
        assert_eq!(env_over_file.metrics_listen, None);
        assert_eq!(env_over_file.limits.max_batch_rows, 7);

        std::env::set_var("ACTWATCH_DATA_DIR", "/from/env");
        let flags_over_env = ServeConfig::resolve(serve_args(&[
            "--config",
            file,
            "--listen",
            "127.0.0.1:4",
            "--metrics-listen",
            "127.0.0.1:5",
        ]))
        .unwrap();
        assert_eq!(flags_over_env.data_dir, PathBuf::from("/from/env"));
        assert_eq!(flags_over_env.listen, "127.0.0.1:4");
        assert_eq!(
            flags_over_env.metrics_listen.as_deref(),
            Some("127.0.0.1:5")
        );

        let flag_off = ServeConfig::resolve(serve_args(&["--metrics-listen", "off"])).unwrap();
        assert_eq!(flag_off.metrics_listen, None);
        for v in ENV {
            std::env::remove_var(v);
        }
    }

    #[test]
    fn unknown_config_keys_are_errors_naming_the_key() {
        let top = toml::from_str::<ConfigFile>("listen = \"x\"\nlisen = \"y\"\n").unwrap_err();
        assert!(top.to_string().contains("lisen"), "{top}");
        let nested = toml::from_str::<ConfigFile>("[limits]\nmax_batch_rows = 1\nmax_rows = 3\n")
            .unwrap_err();
        assert!(nested.to_string().contains("max_rows"), "{nested}");
        let missing = ServeConfig::resolve(serve_args(&["--config", "/nonexistent/actwatch.toml"]));
        assert!(format!("{:#}", missing.unwrap_err()).contains("/nonexistent/actwatch.toml"));
    }
}
