//! Load harness: the real binary under 64 concurrent streams (scoring streams, slow watchers,
//! StreamScores clients that never read) and silent connections, for a bounded time. It prints
//! throughput, batch latency (p50, p99) and the server's peak RSS and virtual memory, and checks
//! that every well-behaved stream got every answer, that the server stays up, and that its memory
//! stays bounded. Nothing here asserts a timing.
//!
//! In CI it runs 5 seconds on the debug build. Longer, and figures worth quoting:
//!
//! ```sh
//! ACTWATCH_LOAD_SECONDS=60 cargo test --release --test load -- --nocapture
//! ```

mod serve_process;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actwatch_core::Dtype;
use actwatch_proto::encode_trace_batch;
use actwatch_proto::v1::{self, stream_scores_request, stream_scores_response};
use actwatch_testkit::Rng;
use serve_process::ServeProcess;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Vector width and vectors per scoring batch.
const D: usize = 384;
const BATCH: usize = 64;
/// The server's default `max_concurrent_streams` (64), split into the three kinds of client.
const SCORERS: usize = 48;
const WATCHERS: usize = 8;
const NON_READERS: usize = 8;
/// Streams per connection (below the default `max_streams_per_client`, 16).
const STREAMS_PER_CONNECTION: usize = 8;
/// Connections that connect and say nothing.
const SILENT: usize = 32;

fn kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn batch(rng: &mut Rng, prefix: &str, rows: usize) -> (v1::TraceBatch, Vec<String>) {
    let ids: Vec<String> = (0..rows).map(|i| format!("{prefix}{i}")).collect();
    let b = encode_trace_batch(
        "h",
        ids.clone(),
        vec![],
        D,
        &rng.gaussian_rows(rows, D, 0.0),
        Dtype::F32,
    );
    (b, ids)
}

/// One scoring stream until `until`: a batch of single-trace computations, its trace scores,
/// then their completion and their results. Returns per-batch latencies (seconds).
async fn score_until(
    mut client: actwatch_testkit::server::Client,
    stream: usize,
    until: Instant,
    vectors: Arc<AtomicU64>,
) -> Vec<f64> {
    let (tx, rx) = mpsc::channel(4);
    let send = |event| v1::StreamScoresRequest { event: Some(event) };
    tx.send(send(stream_scores_request::Event::Monitor("load".into())))
        .await
        .unwrap();
    let mut inbound = client
        .stream_scores(ReceiverStream::new(rx))
        .await
        .expect("a scoring stream within the limits")
        .into_inner();
    let mut rng = Rng::new(1000 + stream as u64);
    let mut latencies = Vec::new();
    let mut round = 0;
    while Instant::now() < until {
        let (b, ids) = batch(&mut rng, &format!("s{stream}-{round}-"), BATCH);
        round += 1;
        let sent = Instant::now();
        tx.send(send(stream_scores_request::Event::Batch(b)))
            .await
            .unwrap();
        match inbound.message().await.unwrap().and_then(|m| m.event) {
            Some(stream_scores_response::Event::Traces(t)) => assert_eq!(t.traces.len(), BATCH),
            other => panic!("expected trace scores, got {other:?}"),
        }
        latencies.push(sent.elapsed().as_secs_f64());
        tx.send(send(stream_scores_request::Event::Complete(
            v1::CompleteComputations { trace_ids: ids },
        )))
        .await
        .unwrap();
        for _ in 0..BATCH {
            match inbound.message().await.unwrap().and_then(|m| m.event) {
                Some(stream_scores_response::Event::Computation(_)) => {}
                other => panic!("expected a computation, got {other:?}"),
            }
        }
        vectors.fetch_add(BATCH as u64, Ordering::Relaxed);
    }
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streams_slow_readers_and_silent_connections() {
    let seconds: u64 = std::env::var("ACTWATCH_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProcess::start(dir.path()).await;
    let mut admin = server.client().await;
    admin
        .create_monitor(v1::CreateMonitorRequest {
            name: "load".into(),
            spec: None,
        })
        .await
        .unwrap();
    let mut rng = Rng::new(7);
    let (reference, _) = batch(&mut rng, "r", 6000);
    admin
        .ingest_reference(tokio_stream::iter([v1::IngestReferenceRequest {
            monitor: "load".into(),
            batch: Some(reference),
            labels: vec![],
        }]))
        .await
        .unwrap();
    let mut fit = admin
        .fit(v1::FitRequest {
            monitor: "load".into(),
            incremental: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while fit.message().await.unwrap().is_some() {}

    // Silent connections first: they must not keep anyone out.
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }

    let mut connections = Vec::new();
    for _ in 0..(SCORERS + WATCHERS + NON_READERS).div_ceil(STREAMS_PER_CONNECTION) {
        connections.push(server.client().await);
    }
    let connection = |i: usize| connections[i / STREAMS_PER_CONNECTION].clone();

    // StreamScores clients that send and never read: their buffers fill, their tasks wait.
    let mut non_readers = Vec::new();
    for i in 0..NON_READERS {
        let mut client = connection(SCORERS + WATCHERS + i);
        let (tx, rx) = mpsc::channel(64);
        tx.send(v1::StreamScoresRequest {
            event: Some(stream_scores_request::Event::Monitor("load".into())),
        })
        .await
        .unwrap();
        let mut rng = Rng::new(500 + i as u64);
        for round in 0..40 {
            let (b, _) = batch(&mut rng, &format!("n{i}-{round}-"), BATCH);
            let _ = tx.try_send(v1::StreamScoresRequest {
                event: Some(stream_scores_request::Event::Batch(b)),
            });
        }
        let response = client.stream_scores(ReceiverStream::new(rx)).await.unwrap();
        non_readers.push((tx, response));
    }

    // Slow watchers: one event every 500 ms at most.
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut watchers = Vec::new();
    for i in 0..WATCHERS {
        let mut client = connection(SCORERS + i);
        let mut stream = client
            .watch_flags(v1::WatchFlagsRequest::default())
            .await
            .unwrap()
            .into_inner();
        watchers.push(tokio::spawn(async move {
            let mut seen = 0u64;
            while Instant::now() < until {
                match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                    Ok(Ok(Some(_))) => seen += 1,
                    Ok(Ok(None)) => break,
                    // A watcher this slow may be cut off for lagging (flag_buffer); that is
                    // the documented behaviour, not a failure of the others.
                    Ok(Err(s)) => {
                        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                        break;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            seen
        }));
    }

    let vectors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let scorers: Vec<_> = (0..SCORERS)
        .map(|i| tokio::spawn(score_until(connection(i), i, until, vectors.clone())))
        .collect();
    let mut latencies = Vec::new();
    for s in scorers {
        latencies.extend(s.await.expect("a scoring stream failed"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut flags = 0;
    for w in watchers {
        flags += w.await.unwrap();
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let (rss, vm) = (kib(&status, "VmHWM:"), kib(&status, "VmPeak:"));

    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] * 1e3;
    let vectors = vectors.load(Ordering::Relaxed);
    eprintln!(
        "load: {SCORERS} scoring streams ({BATCH} x {D} f32 per batch), {WATCHERS} slow watchers \
         ({flags} flags read), {NON_READERS} non-reading streams, {SILENT} silent connections, \
         {elapsed:.1} s: {:.0} vectors/s, {} batches, latency p50 {:.1} ms p99 {:.1} ms; server \
         peak RSS {:.0} MiB, peak virtual memory {:.0} MiB",
        vectors as f64 / elapsed,
        latencies.len(),
        pct(0.5),
        pct(0.99),
        rss as f64 / 1024.0,
        vm as f64 / 1024.0,
    );
    assert!(!latencies.is_empty(), "no batch was scored");
    // Bounded memory: the reference set is 9 MB; 64 streams hold at most their buffers.
    assert!(rss < 1 << 20, "peak RSS {rss} KiB");

    // Still serving, and the silent connections have been closed (handshake timeout).
    let listed = admin
        .list_monitors(v1::ListMonitorsRequest {})
        .await
        .expect("the server is alive")
        .into_inner();
    assert_eq!(listed.monitors.len(), 1);
    drop((non_readers, silent, connections, admin));
    server.sigterm();
    assert!(server.exit_ok().await, "a clean exit after the load");
}
