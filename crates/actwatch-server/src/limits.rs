/// Largest request message accepted, in bytes (a batch of 65,536 × 256 f32 values).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Most rows (traces) in one `TraceBatch`.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 65_536;
/// Widest vector accepted, in components: the hidden size of the largest open models (16,384) fits.
/// A full-covariance Gaussian at this width holds a 2 GiB matrix; fitting memory grows with the square.
pub const DEFAULT_MAX_VECTOR_WIDTH: usize = 16_384;
/// Most sites one monitor may have (e.g. 128 layers with two hook points each).
pub const DEFAULT_MAX_SITES_PER_MONITOR: usize = 256;
/// Most ingests (IngestReference streams committed) one monitor may hold. Each is listed in
/// `state.json`, which is rewritten at every commit, and compared by the reference check; send
/// reference data in fewer, larger streams beyond.
pub const DEFAULT_MAX_INGESTS_PER_MONITOR: usize = 10_000;
/// Longest site name, in bytes.
pub const DEFAULT_MAX_SITE_NAME_BYTES: usize = 128;
/// Longest trace (computation) id, in bytes.
pub const DEFAULT_MAX_TRACE_ID_BYTES: usize = 256;
/// Most streaming calls (IngestReference, Fit, StreamScores, WatchFlags) open at once.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: usize = 64;
/// Most streaming calls one client holds open at once: the token's principal when tokens are
/// configured, else one connection. A quarter of the server's, so one client cannot starve the rest.
pub const DEFAULT_MAX_STREAMS_PER_CLIENT: usize = 16;
/// Seconds a new connection has to complete its TLS handshake, or without TLS to send its first
/// bytes (the HTTP/2 preface), before it is closed: a client that connects and says nothing holds
/// a socket for at most this long.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECONDS: u64 = 10;
/// Seconds after which a connection is asked to go away (HTTP/2 GOAWAY): it takes no new calls,
/// its open streams run to their end, and it closes once they have (at once when it has none).
/// gRPC-core clients reconnect for their next call by themselves (a tonic channel may fail one
/// call that races the close, with CANCELLED, and reconnects on the next), so an idle connection
/// never holds a slot for longer than this, and long watches are never cut by it. (gRPC's `MAX_CONNECTION_AGE`; tonic
/// has no idle timer, and HTTP/2 keepalive pings would keep any such timer from firing.)
pub const DEFAULT_MAX_CONNECTION_AGE_SECONDS: u64 = 1800;
/// Most connections open at once; a connection beyond is closed at accept and logged. `actwatch
/// serve` raises its file-descriptor limit to the hard limit and warns when that is below this.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The most memory one fit may hold at its peak, as estimated before it starts
/// (`actwatch_detect::budget::fit_bytes`): half the machine's physical memory (`MemTotal` in
/// /proc/meminfo), so that a fit never takes what serving needs; 8 GiB where that is unknown.
pub fn default_max_fit_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024 / 2)
}
/// Most fits that run at once (each on a thread of its own, beside the compute pool); a fit
/// beyond waits for one to finish before it starts.
pub const DEFAULT_MAX_CONCURRENT_FITS: usize = 2;
/// Most computations a StreamScores stream may hold open (seen, not yet completed).
pub const DEFAULT_MAX_OPEN_COMPUTATIONS: usize = 100_000;
/// Bytes of traces one scoring stream (or Score request) may hold while they wait for the other
/// sites of their joint vectors (`actwatch_detect::joint`).
pub const DEFAULT_MAX_JOINT_PENDING_BYTES: usize = actwatch_detect::joint::JOINT_PENDING_MAX_BYTES;
/// Score log kept per monitor, in bytes; the oldest entries are dropped beyond it.
pub const DEFAULT_MAX_SCORE_LOG_BYTES: u64 = 64 << 20;
/// Flag events buffered for watchers; a watcher further behind than this is disconnected.
pub const DEFAULT_FLAG_BUFFER: usize = 1024;
/// Seconds a graceful shutdown waits for clients (streams they keep open, responses they do not
/// read) before cutting what is left; work that depends only on the server (a fit) still finishes.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Results returned by QueryScores when the request sets no limit.
pub const DEFAULT_QUERY_LIMIT: usize = 1000;
/// Most results one QueryScores returns, whatever the request asks.
pub const DEFAULT_MAX_QUERY_LIMIT: usize = 100_000;

/// What one server accepts. Every limit hit is answered RESOURCE_EXHAUSTED with a message naming
/// the field. Each default is the `DEFAULT_*` constant of the same name. Deserialises itself (the
/// `[limits]` table of `actwatch serve --config`): absent fields keep their defaults, unknown
/// fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// [`DEFAULT_MAX_BATCH_ROWS`].
    pub max_batch_rows: usize,
    /// [`DEFAULT_MAX_VECTOR_WIDTH`].
    pub max_vector_width: usize,
    /// [`DEFAULT_MAX_SITES_PER_MONITOR`].
    pub max_sites_per_monitor: usize,
    /// [`DEFAULT_MAX_INGESTS_PER_MONITOR`].
    pub max_ingests_per_monitor: usize,
    /// [`DEFAULT_MAX_SITE_NAME_BYTES`].
    pub max_site_name_bytes: usize,
    /// [`DEFAULT_MAX_TRACE_ID_BYTES`].
    pub max_trace_id_bytes: usize,
    /// [`DEFAULT_MAX_CONCURRENT_STREAMS`].
    pub max_concurrent_streams: usize,
    /// [`DEFAULT_MAX_STREAMS_PER_CLIENT`].
    pub max_streams_per_client: usize,
    /// [`DEFAULT_HANDSHAKE_TIMEOUT_SECONDS`].
    pub handshake_timeout_seconds: u64,
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// [`DEFAULT_MAX_CONNECTION_AGE_SECONDS`].
    pub max_connection_age_seconds: u64,
    /// [`default_max_fit_bytes`].
    pub max_fit_bytes: u64,
    /// [`DEFAULT_MAX_CONCURRENT_FITS`].
    pub max_concurrent_fits: usize,
    /// [`DEFAULT_MAX_OPEN_COMPUTATIONS`].
    pub max_open_computations: usize,
    /// [`DEFAULT_MAX_JOINT_PENDING_BYTES`].
    pub max_joint_pending_bytes: usize,
    /// [`DEFAULT_MAX_SCORE_LOG_BYTES`].
    pub max_score_log_bytes: u64,
    /// [`DEFAULT_FLAG_BUFFER`].
    pub flag_buffer: usize,
    /// [`DEFAULT_SHUTDOWN_GRACE_SECONDS`].
    pub shutdown_grace_seconds: u64,
    /// [`DEFAULT_QUERY_LIMIT`].
    pub query_limit: usize,
    /// [`DEFAULT_MAX_QUERY_LIMIT`].
    pub max_query_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            max_vector_width: DEFAULT_MAX_VECTOR_WIDTH,
            max_sites_per_monitor: DEFAULT_MAX_SITES_PER_MONITOR,
            max_ingests_per_monitor: DEFAULT_MAX_INGESTS_PER_MONITOR,
            max_site_name_bytes: DEFAULT_MAX_SITE_NAME_BYTES,
            max_trace_id_bytes: DEFAULT_MAX_TRACE_ID_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_streams_per_client: DEFAULT_MAX_STREAMS_PER_CLIENT,
            handshake_timeout_seconds: DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connection_age_seconds: DEFAULT_MAX_CONNECTION_AGE_SECONDS,
            max_fit_bytes: default_max_fit_bytes(),
            max_concurrent_fits: DEFAULT_MAX_CONCURRENT_FITS,
            max_open_computations: DEFAULT_MAX_OPEN_COMPUTATIONS,
            max_joint_pending_bytes: DEFAULT_MAX_JOINT_PENDING_BYTES,
            max_score_log_bytes: DEFAULT_MAX_SCORE_LOG_BYTES,
            flag_buffer: DEFAULT_FLAG_BUFFER,
            shutdown_grace_seconds: DEFAULT_SHUTDOWN_GRACE_SECONDS,
            query_limit: DEFAULT_QUERY_LIMIT,
            max_query_limit: DEFAULT_MAX_QUERY_LIMIT,
        }
    }
}
