//! Crash loop: the real binary killed with SIGKILL at seeded random moments while clients ingest,
//! fit (full and incremental), score and log, then restarted on the same data directory. After
//! every restart it checks what the server promises:
//!
//! - every acknowledged ingest is there exactly once: the reference rows are the acknowledged
//!   rows, plus at most the one ingest in flight at the kill (committed, its answer lost);
//! - the served fit version is the last acknowledged one, or the fit in flight at the kill, and
//!   the served model is the one fitted as that version: the same p-values on a fixed probe batch
//!   as when that version was first seen;
//! - every acknowledged scoring result reads back from the score log, whole and equal (p-value,
//!   flag, fit version); nothing else reads back but results of the call in flight at the kill;
//! - the restart time (spawn to the first answer).
//!
//! Seeded: the same seed kills at the same moments of the same operations (timing on a shared
//! machine still varies what is in flight). In CI: 8 kills. Longer:
//!
//! ```sh
//! ACTWATCH_CRASH_KILLS=200 ACTWATCH_CRASH_SEED=7 cargo test --release --test crash -- --nocapture
//! ```

mod serve_process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actwatch_core::Dtype;
use actwatch_proto::encode_trace_batch;
use actwatch_proto::v1;
use actwatch_testkit::server::Client;
use actwatch_testkit::Rng;
use serve_process::ServeProcess;

const MONITOR: &str = "m";
const D: usize = 16;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seeded draw in `0..n`.
fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.next_u64() % n
}

/// `n` single-trace computations with ids `{prefix}{i}`.
fn batch(rng: &mut Rng, prefix: &str, n: usize, shift: f64) -> v1::TraceBatch {
    let ids = (0..n).map(|i| format!("{prefix}{i}")).collect();
    encode_trace_batch(
        "h",
        ids,
        vec![],
        D,
        &rng.gaussian_rows(n, D, shift),
        Dtype::F32,
    )
}

/// What the clients saw acknowledged, and what was in flight.
#[derive(Debug, Default)]
struct Ledger {
    acked_rows: u64,
    /// Rows of the ingest under way (0: none).
    inflight_rows: u64,
    acked_fit_version: u64,
    fit_inflight: bool,
    /// trace id -> (p-value, flagged, fit version) of every acknowledged scoring result.
    scores: HashMap<String, (f64, bool, u64)>,
    /// Trace ids of the scoring call under way.
    inflight_scores: Vec<String>,
}

async fn ingest(client: &mut Client, b: v1::TraceBatch) -> Result<u64, tonic::Status> {
    let summary = client
        .ingest_reference(tokio_stream::iter([v1::IngestReferenceRequest {
            monitor: MONITOR.into(),
            batch: Some(b),
            labels: vec![],
        }]))
        .await?
        .into_inner();
    Ok(summary.rows)
}

/// A fit to the end; its version.
async fn fit(client: &mut Client, incremental: bool) -> Result<u64, tonic::Status> {
    let mut progress = client
        .fit(v1::FitRequest {
            monitor: MONITOR.into(),
            incremental,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(p) = progress.message().await? {
        if let Some(v1::fit_progress::Event::Report(r)) = p.event {
            return Ok(r.fit_version);
        }
    }
    Err(tonic::Status::unavailable("the fit ended without a report"))
}

async fn score(
    client: &mut Client,
    b: v1::TraceBatch,
) -> Result<Vec<v1::ComputationScore>, tonic::Status> {
    Ok(client
        .score(v1::ScoreRequest {
            monitor: MONITOR.into(),
            batches: vec![b],
            complete: true,
        })
        .await?
        .into_inner()
        .computations)
}

/// Client operations until the process dies: ingests, fits, scoring calls, in a seeded mix.
async fn operate(mut client: Client, ledger: Arc<Mutex<Ledger>>, seed: u64) {
    let mut rng = Rng::new(seed);
    for op in 0u64.. {
        let pick = below(&mut rng, 10);
        let prefix = format!("s{seed}-{op}-");
        if pick < 4 {
            let n = 20 + below(&mut rng, 200) as usize;
            let shift = if below(&mut rng, 2) == 0 { 0.0 } else { 0.5 };
            let b = batch(&mut rng, &prefix, n, shift);
            ledger.lock().unwrap().inflight_rows = n as u64;
            let Ok(rows) = ingest(&mut client, b).await else {
                return;
            };
            let mut l = ledger.lock().unwrap();
            l.acked_rows += rows;
            l.inflight_rows = 0;
        } else if pick < 6 {
            ledger.lock().unwrap().fit_inflight = true;
            let Ok(version) = fit(&mut client, below(&mut rng, 2) == 0).await else {
                return;
            };
            let mut l = ledger.lock().unwrap();
            l.acked_fit_version = l.acked_fit_version.max(version);
            l.fit_inflight = false;
        } else {
            let n = 1 + below(&mut rng, 60) as usize;
            let b = batch(&mut rng, &prefix, n, 0.0);
            ledger.lock().unwrap().inflight_scores = b.trace_ids.clone();
            let Ok(results) = score(&mut client, b).await else {
                return;
            };
            let mut l = ledger.lock().unwrap();
            for r in results {
                l.scores
                    .insert(r.trace_id, (r.p_value, r.flagged, r.fit_version));
            }
            l.inflight_scores.clear();
        }
    }
}

/// Starts the server and waits for its first answer; the restart time.
async fn restart(dir: &std::path::Path) -> (ServeProcess, Client, Duration) {
    let started = Instant::now();
    let server = ServeProcess::start(dir).await;
    let mut client = server.client().await;
    client
        .get_monitor(v1::GetMonitorRequest {
            name: MONITOR.into(),
        })
        .await
        .expect("the monitor after a restart");
    (server, client, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged() {
    let kills = env_or("ACTWATCH_CRASH_KILLS", 8);
    let seed = env_or("ACTWATCH_CRASH_SEED", 1);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed);

    // Setup, not killed: a monitor with enough reference data to fit, fitted once.
    let server = ServeProcess::start(dir.path()).await;
    let mut client = server.client().await;
    client
        .create_monitor(v1::CreateMonitorRequest {
            name: MONITOR.into(),
            spec: None,
        })
        .await
        .unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let rows = ingest(&mut client, batch(&mut rng, "r", 800, 0.0))
        .await
        .unwrap();
    let version = fit(&mut client, false).await.unwrap();
    {
        let mut l = ledger.lock().unwrap();
        l.acked_rows = rows;
        l.acked_fit_version = version;
    }
    let probe = batch(&mut Rng::new(99), "probe-", 40, 0.3);
    // fit version -> the probe's p-values under the model fitted as that version
    let mut models: HashMap<u64, Vec<f64>> = HashMap::new();
    drop(client);
    let mut server = server;
    let mut restarts = Vec::new();

    for kill in 0..kills {
        let operations = tokio::spawn(operate(
            server.client().await,
            ledger.clone(),
            seed * 1000 + kill,
        ));
        let delay = 100 + below(&mut rng, 1200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        let _ = operations.await;
        drop(server);

        let (next, mut client, took) = restart(dir.path()).await;
        restarts.push(took.as_secs_f64());
        let info = client
            .get_monitor(v1::GetMonitorRequest {
                name: MONITOR.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(info.damaged.is_empty(), "kill {kill}: {}", info.damaged);
        let logged = client
            .query_scores(v1::QueryScoresRequest {
                monitor: MONITOR.into(),
                limit: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        let served = {
            let mut l = ledger.lock().unwrap();

            // Reference rows: the acknowledged ones, plus at most the ingest in flight.
            let rows = info.reference_rows;
            assert!(
                rows == l.acked_rows || rows == l.acked_rows + l.inflight_rows,
                "kill {kill}: {rows} reference rows, {} acknowledged, {} in flight",
                l.acked_rows,
                l.inflight_rows
            );
            l.acked_rows = rows;
            l.inflight_rows = 0;

            // Fit version: the last acknowledged one, or the fit in flight.
            let served = info.fit_version;
            assert!(
                served == l.acked_fit_version || (l.fit_inflight && served > l.acked_fit_version),
                "kill {kill}: fit version {served} served, {} acknowledged (a fit in flight: {})",
                l.acked_fit_version,
                l.fit_inflight
            );
            l.acked_fit_version = served;
            l.fit_inflight = false;

            // Every acknowledged result reads back whole and equal; only the call in flight adds.
            let mut read_back: HashMap<&str, &v1::ComputationScore> = HashMap::new();
            for r in &logged {
                read_back.insert(r.trace_id.as_str(), r);
            }
            for (id, &(p, flagged, version)) in &l.scores {
                let r = read_back
                    .get(id.as_str())
                    .unwrap_or_else(|| panic!("kill {kill}: acknowledged result {id} lost"));
                assert_eq!(
                    (r.p_value, r.flagged, r.fit_version),
                    (p, flagged, version),
                    "kill {kill}: {id}"
                );
            }
            let probe_ids: Vec<&str> = logged
                .iter()
                .map(|r| r.trace_id.as_str())
                .filter(|id| id.starts_with("probe-"))
                .collect();
            for r in &logged {
                let id = r.trace_id.as_str();
                assert!(
                    l.scores.contains_key(id)
                        || l.inflight_scores.iter().any(|i| i == id)
                        || probe_ids.contains(&id),
                    "kill {kill}: {id} read back but never acknowledged"
                );
            }
            for id in std::mem::take(&mut l.inflight_scores) {
                if let Some(r) = read_back.get(id.as_str()) {
                    l.scores.insert(id, (r.p_value, r.flagged, r.fit_version));
                }
            }
            served
        };

        // The served model is the one fitted as the served version.
        let mut probe_now = probe.clone();
        probe_now.trace_ids = (0..40).map(|i| format!("probe-{kill}-{i}")).collect();
        let results = score(&mut client, probe_now).await.unwrap();
        assert!(results.iter().all(|r| r.fit_version == served));
        let p: Vec<f64> = results.iter().map(|r| r.p_value).collect();
        match models.get(&served) {
            Some(seen) => assert_eq!(
                seen, &p,
                "kill {kill}: fit version {served} serves another model than before"
            ),
            None => {
                models.insert(served, p);
            }
        }
        {
            let mut l = ledger.lock().unwrap();
            for r in results {
                l.scores
                    .insert(r.trace_id, (r.p_value, r.flagged, r.fit_version));
            }
        }
        server = next;
    }

    restarts.sort_by(f64::total_cmp);
    {
        let l = ledger.lock().unwrap();
        eprintln!(
        "crash loop (seed {seed}): {kills} SIGKILLs survived; {} reference rows, fit version {}, \
         {} fit versions checked, {} acknowledged results read back equal; restart median \
         {:.2} s, max {:.2} s",
        l.acked_rows,
        l.acked_fit_version,
        models.len(),
        l.scores.len(),
        restarts[restarts.len() / 2],
        restarts[restarts.len() - 1],
    );
    }
    server.sigterm();
    assert!(server.exit_ok().await);
}
