//! Prometheus metrics: a small hand-written registry of atomics rendered in the text exposition
//! format 0.0.4, and a minimal HTTP/1.1 responder for `GET /metrics` on its own listener.
//!
//! Counters are updated on the hot path with relaxed atomic adds; the per-monitor table is behind
//! a mutex taken only to find a monitor's counters (once per call) and to render. Rendering reads
//! each atomic once, so a scrape is a consistent-enough snapshot, never a stall for scoring.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;

/// Upper bounds (seconds) of the `actwatch_score_latency_seconds` buckets: 100 µs to 10 s.
pub const SCORE_LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Largest HTTP request head the metrics responder reads.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Metrics connections open at once; beyond, the oldest still silent one is closed.
const MAX_CONNECTIONS: usize = 16;

/// Counters of one monitor.
#[derive(Debug)]
pub struct MonitorCounters {
    pub ingest_rows: AtomicU64,
    pub ingest_bytes: AtomicU64,
    pub scored_traces: AtomicU64,
    pub scored_computations: AtomicU64,
    pub flags: AtomicU64,
    /// Computations flagged by at least one concept probe.
    pub probe_flags: AtomicU64,
    /// Batches scored despite conflicting provenance (provenance policy "warn").
    pub provenance_warnings: AtomicU64,
    /// The monitor's target false-positive rate, as `f64::to_bits`.
    target_fpr: AtomicU64,
}

impl MonitorCounters {
    fn new(target_fpr: f64) -> Self {
        Self {
            ingest_rows: AtomicU64::new(0),
            ingest_bytes: AtomicU64::new(0),
            scored_traces: AtomicU64::new(0),
            scored_computations: AtomicU64::new(0),
            flags: AtomicU64::new(0),
            probe_flags: AtomicU64::new(0),
            provenance_warnings: AtomicU64::new(0),
            target_fpr: AtomicU64::new(target_fpr.to_bits()),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The RPC whose scoring latency is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreRpc {
    /// One unary `Score` call.
    Score,
    /// One batch of a `StreamScores` stream.
    StreamScores,
}

impl ScoreRpc {
    const ALL: [ScoreRpc; 2] = [ScoreRpc::Score, ScoreRpc::StreamScores];

    fn label(self) -> &'static str {
        match self {
            ScoreRpc::Score => "Score",
            ScoreRpc::StreamScores => "StreamScores",
        }
    }
}

#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket of [`SCORE_LATENCY_BUCKETS`]; the last slot is +Inf.
    buckets: [AtomicU64; SCORE_LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = SCORE_LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(SCORE_LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Every gRPC status code, in numeric order (`Code as usize` indexes it).
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The canonical name of a gRPC status code, as in the gRPC spec (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The server's metrics. Shared (`Arc`) by the service and the metrics responder.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Per monitor, by name; a deleted monitor's series disappear.
    monitors: Mutex<BTreeMap<String, Arc<MonitorCounters>>>,
    /// Indexed like [`ScoreRpc::ALL`].
    score_latency: [Histogram; 2],
    /// Indexed by `Code as usize`.
    rejected: [AtomicU64; 17],
}

impl Metrics {
    /// Registers a monitor (at load or creation) with zeroed counters, or updates its target FPR.
    pub fn register_monitor(&self, name: &str, target_fpr: f64) -> Arc<MonitorCounters> {
        let mut m = self.monitors.lock().unwrap_or_else(PoisonError::into_inner);
        let c = m
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(MonitorCounters::new(target_fpr)));
        c.target_fpr.store(target_fpr.to_bits(), Ordering::Relaxed);
        c.clone()
    }

    /// The counters of a monitor; registered with an unknown (NaN) target FPR if absent.
    pub fn monitor(&self, name: &str) -> Arc<MonitorCounters> {
        let mut m = self.monitors.lock().unwrap_or_else(PoisonError::into_inner);
        m.entry(name.to_string())
            .or_insert_with(|| Arc::new(MonitorCounters::new(f64::NAN)))
            .clone()
    }

    pub fn remove_monitor(&self, name: &str) {
        let mut m = self.monitors.lock().unwrap_or_else(PoisonError::into_inner);
        m.remove(name);
    }

    pub fn observe_score_latency(&self, rpc: ScoreRpc, d: Duration) {
        self.score_latency[rpc as usize].observe(d);
    }

    pub fn reject(&self, code: Code) {
        self.rejected[code as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let monitors: Vec<(String, Arc<MonitorCounters>)> = self
            .monitors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = String::with_capacity(4096);
        type Field = fn(&MonitorCounters) -> &AtomicU64;
        let counters: [(&str, &str, Field); 7] = [
            (
                "actwatch_ingest_rows_total",
                "Reference rows (traces) committed by IngestReference.",
                |c| &c.ingest_rows,
            ),
            (
                "actwatch_ingest_bytes_total",
                "Activation payload bytes committed by IngestReference.",
                |c| &c.ingest_bytes,
            ),
            (
                "actwatch_scored_traces_total",
                "Traces scored by Score and StreamScores.",
                |c| &c.scored_traces,
            ),
            (
                "actwatch_scored_computations_total",
                "Computations completed and scored.",
                |c| &c.scored_computations,
            ),
            (
                "actwatch_flags_total",
                "Computations flagged as anomalous (p-value at or below the target FPR).",
                |c| &c.flags,
            ),
            (
                "actwatch_probe_flags_total",
                "Computations flagged by at least one concept probe.",
                |c| &c.probe_flags,
            ),
            (
                "actwatch_provenance_warnings_total",
                "Batches scored despite provenance that conflicts with the monitor's (policy warn).",
                |c| &c.provenance_warnings,
            ),
        ];
        for (name, help, field) in counters {
            header(&mut out, name, help, "counter");
            for (m, c) in &monitors {
                let v = field(c).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{monitor=\"{}\"}} {v}", escape_label(m));
            }
        }
        render_gauges(&mut out, &monitors);
        self.render_latency(&mut out);
        header(
            &mut out,
            "actwatch_rejected_calls_total",
            "Calls that ended with an error status, by gRPC code.",
            "counter",
        );
        for code in CODES {
            let v = self.rejected[code as usize].load(Ordering::Relaxed);
            if v > 0 {
                let _ = writeln!(
                    out,
                    "actwatch_rejected_calls_total{{code=\"{}\"}} {v}",
                    code_name(code)
                );
            }
        }
        out
    }

    /// The score-latency histogram, one series per scoring RPC.
    fn render_latency(&self, out: &mut String) {
        let name = "actwatch_score_latency_seconds";
        header(
            out,
            name,
            "Time to score one Score call or one StreamScores batch.",
            "histogram",
        );
        for rpc in ScoreRpc::ALL {
            let h = &self.score_latency[rpc as usize];
            let rpc = rpc.label();
            let mut cumulative = 0;
            for (i, bound) in SCORE_LATENCY_BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{rpc=\"{rpc}\",le=\"{}\"}} {cumulative}",
                    float(*bound)
                );
            }
            cumulative += h.buckets[SCORE_LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{rpc=\"{rpc}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{rpc=\"{rpc}\"}} {}", float(sum));
            let _ = writeln!(out, "{name}_count{{rpc=\"{rpc}\"}} {cumulative}");
        }
    }
}

/// Each monitor's observed flag rate and target false-positive rate.
fn render_gauges(out: &mut String, monitors: &[(String, Arc<MonitorCounters>)]) {
    header(
        out,
        "actwatch_observed_flag_rate",
        "Flagged computations over scored computations since the server started.",
        "gauge",
    );
    for (m, c) in monitors {
        let n = c.scored_computations.load(Ordering::Relaxed);
        if n > 0 {
            let rate = c.flags.load(Ordering::Relaxed) as f64 / n as f64;
            let _ = writeln!(
                out,
                "actwatch_observed_flag_rate{{monitor=\"{}\"}} {}",
                escape_label(m),
                float(rate)
            );
        }
    }
    header(
        out,
        "actwatch_target_fpr",
        "The false-positive rate each monitor is calibrated to.",
        "gauge",
    );
    for (m, c) in monitors {
        let fpr = f64::from_bits(c.target_fpr.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "actwatch_target_fpr{{monitor=\"{}\"}} {}",
            escape_label(m),
            float(fpr)
        );
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A float as the exposition format spells it (`NaN`, `+Inf`, `-Inf`, else Rust's shortest form).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Escapes a label value: backslash, double quote and line feed, as the format requires.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Answers `GET /metrics` (and `HEAD`) on `listener` until `stop` becomes true; anything else is
/// 404 (another path) or 405 (another method). One request per connection (`Connection: close`).
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    // Each open connection, and whether its request has arrived. When all MAX_CONNECTIONS are
    // open, the oldest one still waiting for its request is closed to make room: connections
    // that say nothing cannot keep a scrape waiting.
    let mut open: std::collections::VecDeque<(tokio::task::AbortHandle, Arc<AtomicBool>)> =
        std::collections::VecDeque::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                open.retain(|(task, _)| !task.is_finished());
                if open.len() >= MAX_CONNECTIONS {
                    match open
                        .iter()
                        .position(|(_, asked)| !asked.load(Ordering::Relaxed))
                    {
                        Some(idle) => {
                            if let Some((task, _)) = open.remove(idle) {
                                task.abort();
                            }
                        }
                        // every connection is being answered: this one waits its turn elsewhere
                        None => continue,
                    }
                }
                let asked = Arc::new(AtomicBool::new(false));
                let metrics = metrics.clone();
                let flag = asked.clone();
                let task = tokio::spawn(async move {
                    if let Err(e) = respond(stream, &metrics, &flag).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
                open.push_back((task.abort_handle(), asked));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(
    mut stream: TcpStream,
    metrics: &Metrics,
    asked: &AtomicBool,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read_head = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_BYTES {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read_head).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    }
    asked.store(true, Ordering::Relaxed);
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.render()),
        (_, "/metrics") => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "see /metrics\n".into()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("plain-name_1.0"), "plain-name_1.0");
    }

    #[test]
    fn render_counts_rates_buckets_and_codes() {
        let m = Metrics::default();
        let c = m.register_monitor("m\"1", 0.01);
        MonitorCounters::add(&c.scored_computations, 4);
        MonitorCounters::add(&c.flags, 1);
        m.observe_score_latency(ScoreRpc::Score, Duration::from_micros(50));
        m.observe_score_latency(ScoreRpc::Score, Duration::from_millis(3));
        m.observe_score_latency(ScoreRpc::StreamScores, Duration::from_secs(60));
        m.reject(Code::InvalidArgument);
        m.reject(Code::InvalidArgument);
        let text = m.render();
        for line in [
            "actwatch_flags_total{monitor=\"m\\\"1\"} 1",
            "actwatch_observed_flag_rate{monitor=\"m\\\"1\"} 0.25",
            "actwatch_target_fpr{monitor=\"m\\\"1\"} 0.01",
            "actwatch_score_latency_seconds_bucket{rpc=\"Score\",le=\"0.0001\"} 1",
            "actwatch_score_latency_seconds_bucket{rpc=\"Score\",le=\"0.0025\"} 1",
            "actwatch_score_latency_seconds_bucket{rpc=\"Score\",le=\"0.005\"} 2",
            "actwatch_score_latency_seconds_count{rpc=\"Score\"} 2",
            "actwatch_score_latency_seconds_bucket{rpc=\"StreamScores\",le=\"10\"} 0",
            "actwatch_score_latency_seconds_bucket{rpc=\"StreamScores\",le=\"+Inf\"} 1",
            "actwatch_rejected_calls_total{code=\"INVALID_ARGUMENT\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        m.remove_monitor("m\"1");
        assert!(!m.render().contains("monitor="));
    }
}
