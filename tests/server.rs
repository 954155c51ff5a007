//! End to end over real gRPC on 127.0.0.1 (ephemeral ports): an in-process `actwatch_server::serve`
//! task and the generated tonic client. Ingest the MiniLM reference set through the API, fit,
//! stream-score the dev files and get the same p-values as the batch pipeline on the same
//! artifact; restart and get the same answers; bad input answered with precise statuses while
//! another stream keeps working.

mod serve_process;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actwatch_core::Dtype;
use actwatch_io::artifact::load_monitor;
use actwatch_io::pipeline::{score_computations, NoProgress};
use actwatch_io::reader::{ReadOptions, TraceReader};
use actwatch_proto::encode_trace_batch;
use actwatch_proto::v1::{self, fit_progress, stream_scores_request, stream_scores_response};
use actwatch_server::Limits;
use actwatch_testkit::server::{Client, TestServer};
use actwatch_testkit::{minilm, Rng};
use arrow::array::AsArray;
use serve_process::ServeProcess;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn data(name: &str) -> PathBuf {
    minilm::file(name)
}

fn minilm_read_options() -> ReadOptions {
    minilm::read_options()
}

/// One proto batch per (reader batch, site group): exactly the blocks the batch pipeline scores.
fn file_batches(path: &Path, dtype: Dtype) -> (Vec<v1::TraceBatch>, Vec<String>) {
    file_batches_with(path, dtype, minilm_read_options())
}

/// [`file_batches`] with other read options (and the file's positions, when it has them).
fn file_batches_with(
    path: &Path,
    dtype: Dtype,
    read: ReadOptions,
) -> (Vec<v1::TraceBatch>, Vec<String>) {
    let reader = TraceReader::open(&[path.to_path_buf()], read).unwrap();
    let mut out = Vec::new();
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for batch in reader {
        let batch = batch.unwrap();
        for id in &batch.trace_ids {
            if seen.insert(id.clone()) {
                ids.push(id.clone());
            }
        }
        for (site, rows) in batch.site_groups() {
            let v = batch.gather(&rows).unwrap();
            let trace_ids = rows.iter().map(|&r| batch.trace_ids[r].clone()).collect();
            let positions = batch
                .positions
                .as_ref()
                .map_or_else(Vec::new, |p| rows.iter().map(|&r| p[r]).collect());
            out.push(encode_trace_batch(
                &site,
                trace_ids,
                positions,
                v.dim(),
                v.as_slice(),
                dtype,
            ));
        }
    }
    (out, ids)
}

async fn create(client: &mut Client, name: &str) -> v1::MonitorInfo {
    client
        .create_monitor(v1::CreateMonitorRequest {
            name: name.into(),
            spec: None,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn ingest(
    client: &mut Client,
    monitor: &str,
    batches: Vec<v1::TraceBatch>,
) -> Result<v1::IngestReferenceSummary, tonic::Status> {
    let unlabelled = batches.into_iter().map(|b| (b, Vec::new())).collect();
    ingest_labelled(client, monitor, unlabelled).await
}

/// One IngestReference stream of `batches`, each with its labels (empty: reference traffic).
async fn ingest_labelled(
    client: &mut Client,
    monitor: &str,
    batches: Vec<(v1::TraceBatch, Vec<bool>)>,
) -> Result<v1::IngestReferenceSummary, tonic::Status> {
    let msgs: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(i, (b, labels))| v1::IngestReferenceRequest {
            monitor: if i == 0 {
                monitor.into()
            } else {
                String::new()
            },
            batch: Some(b),
            labels,
        })
        .collect();
    client
        .ingest_reference(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// Fits and returns (progress messages seen, the report).
async fn fit(client: &mut Client, monitor: &str) -> (usize, v1::FitReport) {
    fit_with(client, monitor, false).await
}

async fn fit_with(client: &mut Client, monitor: &str, incremental: bool) -> (usize, v1::FitReport) {
    let mut stream = client
        .fit(v1::FitRequest {
            monitor: monitor.into(),
            incremental,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut phases = 0;
    let mut report = None;
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event.unwrap() {
            fit_progress::Event::Phase(p) => {
                assert!(report.is_none(), "progress after the report");
                assert!(
                    [
                        "fit",
                        "examples",
                        "calibrate",
                        "calibrate_joint",
                        "calibrate_examples",
                        "check"
                    ]
                    .contains(&p.name.as_str()),
                    "{p:?}"
                );
                phases += 1;
            }
            fit_progress::Event::Report(r) => report = Some(r),
        }
    }
    (phases, report.expect("the fit ends with a report"))
}

/// An open StreamScores call: send requests, read responses.
#[derive(Debug)]
struct ScoreStream {
    tx: mpsc::Sender<v1::StreamScoresRequest>,
    rx: tonic::Streaming<v1::StreamScoresResponse>,
}

impl ScoreStream {
    async fn open(client: &mut Client, monitor: &str) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(v1::StreamScoresRequest {
            event: Some(stream_scores_request::Event::Monitor(monitor.into())),
        })
        .await
        .unwrap();
        let rx = client
            .stream_scores(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    async fn send(&self, event: stream_scores_request::Event) {
        self.tx
            .send(v1::StreamScoresRequest { event: Some(event) })
            .await
            .unwrap();
    }

    async fn batch(&mut self, b: v1::TraceBatch) -> Result<Vec<v1::TraceScore>, tonic::Status> {
        Ok(self.batch_and_flags(b).await?.traces)
    }

    /// A batch's per-trace scores and the computations it flagged early.
    async fn batch_and_flags(
        &mut self,
        b: v1::TraceBatch,
    ) -> Result<v1::TraceScores, tonic::Status> {
        let rows = b.trace_ids.len();
        self.send(stream_scores_request::Event::Batch(b)).await;
        match self.rx.message().await?.and_then(|m| m.event) {
            Some(stream_scores_response::Event::Traces(t)) => {
                assert_eq!(t.traces.len(), rows);
                Ok(t)
            }
            other => panic!("expected trace scores, got {other:?}"),
        }
    }

    async fn complete(&mut self, ids: Vec<String>) -> Vec<v1::ComputationScore> {
        let n = ids.len();
        self.send(stream_scores_request::Event::Complete(
            v1::CompleteComputations { trace_ids: ids },
        ))
        .await;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.rx.message().await.unwrap().and_then(|m| m.event) {
                Some(stream_scores_response::Event::Computation(c)) => out.push(c),
                other => panic!("expected a computation, got {other:?}"),
            }
        }
        out
    }
}

fn status_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    r.expect_err("expected an error status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_fit_stream_score_match_the_batch_pipeline_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;

    // Health and the service are up.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "actwatch.v1.ActivationMonitor".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let info = create(&mut client, "minilm").await;
    assert!(!info.fitted);
    assert_eq!(info.spec.unwrap().detectors, ["gaussian", "knn"]);
    let again = client
        .create_monitor(v1::CreateMonitorRequest {
            name: "minilm".into(),
            spec: None,
        })
        .await;
    assert_eq!(status_of(again).code(), Code::AlreadyExists);

    // Ingest the reference set through the API, f32 on the wire.
    let (train, _) = file_batches(&data("train.parquet"), Dtype::F32);
    let n_batches = train.len() as u64;
    let summary = ingest(&mut client, "minilm", train).await.unwrap();
    assert_eq!(summary.rows, 18_000);
    assert_eq!(summary.total_rows, 18_000);
    assert_eq!(summary.batches, n_batches);
    assert_eq!(summary.bytes, 18_000 * 384 * 4);

    let (phases, report) = fit(&mut client, "minilm").await;
    assert!(phases >= 2, "{phases} progress messages");
    assert_eq!(report.fit_version, 1);
    assert_eq!(report.reference_rows, 18_000);
    assert!(report.calibration_computations > 1000);
    let info = client
        .get_monitor(v1::GetMonitorRequest {
            name: "minilm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.fitted);
    assert_eq!(info.sites.len(), 3);
    assert!(info
        .sites
        .iter()
        .all(|s| s.width == 384 && s.reference_rows == 6000));

    // A watcher, listening before anything is scored.
    let mut watcher = client
        .watch_flags(v1::WatchFlagsRequest {
            monitors: vec!["minilm".into()],
            max_p_value: 0.0,
        })
        .await
        .unwrap()
        .into_inner();

    // The batch pipeline on the server's own fitted artifact: the oracle.
    let (artifact, _) = load_monitor(&dir.path().join("monitors/minilm/fitted")).unwrap();
    let mut served: HashMap<String, v1::ComputationScore> = HashMap::new();
    let mut total_flagged = 0;
    for file in ["dev_id.parquet", "dev_ood_code.parquet"] {
        let (batches, ids) = file_batches(&data(file), Dtype::F32);
        let mut stream = ScoreStream::open(&mut client, "minilm").await.unwrap();
        for b in batches {
            stream.batch(b).await.unwrap();
        }
        let results = stream.complete(ids.clone()).await;
        let oracle = score_computations(
            &artifact,
            &[data(file)],
            &minilm_read_options(),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(oracle.ids, ids);
        for (c, (id, want)) in results.iter().zip(oracle.ids.iter().zip(&oracle.results)) {
            assert_eq!(&c.trace_id, id);
            assert_eq!(
                c.p_value, want.p_value,
                "{id}: p-value differs from the batch pipeline"
            );
            assert_eq!(c.score, want.score, "{id}");
            assert_eq!(c.flagged, want.flagged, "{id}");
            assert_eq!(c.flagged_at, want.flagged_at, "{id}");
            assert_eq!(c.traces, want.traces);
            assert_eq!(c.fit_version, 1);
            let slot_p: Vec<Option<f64>> = c.slots.iter().map(|s| s.p_value).collect();
            assert_eq!(slot_p, want.slot_p);
            served.insert(id.clone(), c.clone());
        }
        total_flagged += results.iter().filter(|c| c.flagged).count();
        if file == "dev_ood_code.parquet" {
            let flagged = results.iter().filter(|c| c.flagged).count();
            assert!(flagged > 0, "no code line flagged");
        }
    }

    // The watcher saw a flagged computation of this monitor.
    let event = tokio::time::timeout(Duration::from_secs(30), watcher.message())
        .await
        .expect("a flag event arrives")
        .unwrap()
        .expect("the watch stream is open");
    // The default monitor (max over traces, min-p) flags early: the first event is the running
    // result of a computation flagged by its first site, before it was complete; its final
    // result is flagged too and says where it was first flagged.
    let flagged = event.computation.unwrap();
    assert_eq!(flagged.monitor, "minilm");
    assert!(flagged.flagged && flagged.partial, "{flagged:?}");
    let fin = &served[&flagged.trace_id];
    assert!(fin.flagged && !fin.partial);
    assert_eq!(fin.flagged_at, flagged.flagged_at);
    assert!(flagged.traces < fin.traces && flagged.p_value >= fin.p_value);
    drop(watcher);

    // QueryScores: by id, and flagged only, from the durable log.
    // Every result reads back from the log exactly as it was sent (floats round-trip).
    let mut ids: Vec<&String> = served.keys().collect();
    ids.sort();
    let q = client
        .query_scores(v1::QueryScoresRequest {
            monitor: "minilm".into(),
            trace_ids: ids.iter().map(|s| s.to_string()).collect(),
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.results.len(), served.len());
    for r in &q.results {
        let c = &served[&r.trace_id];
        assert_eq!((r.p_value, r.score), (c.p_value, c.score), "{}", r.trace_id);
        assert_eq!(r.slots, c.slots, "{}", r.trace_id);
    }
    let some_id = served.keys().find(|k| k.contains("code")).unwrap().clone();
    let q = client
        .query_scores(v1::QueryScoresRequest {
            monitor: "minilm".into(),
            trace_ids: vec![some_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.results.len(), 1);
    assert_eq!(q.results[0].p_value, served[&some_id].p_value);
    let q = client
        .query_scores(v1::QueryScoresRequest {
            monitor: "minilm".into(),
            flagged_only: true,
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.results.len(), total_flagged.min(50));
    assert!(q.results.iter().all(|c| c.flagged));
    // Newest first: the last flagged code line comes first.
    assert!(q
        .results
        .windows(2)
        .all(|w| w[0].scored_at_unix_ms >= w[1].scored_at_unix_ms));

    // Restart on the same data directory: the same answers, now from the unary Score.
    drop(client);
    drop(health);
    server.stop().await;
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    let info = client
        .get_monitor(v1::GetMonitorRequest {
            name: "minilm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.fitted);
    assert_eq!(info.fit_version, 1);
    assert_eq!(info.reference_rows, 18_000);
    let (batches, _) = file_batches(&data("dev_ood_code.parquet"), Dtype::F32);
    let r = client
        .score(v1::ScoreRequest {
            monitor: "minilm".into(),
            batches,
            complete: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.traces.len(), 1500);
    assert_eq!(r.computations.len(), 500);
    for c in &r.computations {
        assert_eq!(c.p_value, served[&c.trace_id].p_value, "{}", c.trace_id);
        assert_eq!(c.score, served[&c.trace_id].score);
    }
    // The log kept the results from before the restart too.
    let q = client
        .query_scores(v1::QueryScoresRequest {
            monitor: "minilm".into(),
            trace_ids: vec![some_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.results.len(), 2);
    drop(client);
    server.stop().await;
}

/// Scores a file through the unary Score call: (trace id, score, p-value) per computation.
async fn unary_scores(client: &mut Client, monitor: &str, file: &str) -> Vec<(String, f64, f64)> {
    let (batches, _) = file_batches(&data(file), Dtype::F32);
    let r = client
        .score(v1::ScoreRequest {
            monitor: monitor.into(),
            batches,
            complete: true,
        })
        .await
        .unwrap()
        .into_inner();
    r.computations
        .into_iter()
        .map(|c| (c.trace_id, c.score, c.p_value))
        .collect()
}

/// An incremental Fit folds only the segments ingested since the last fit, and the monitor it
/// installs scores exactly like a full refit on the same data; with nothing new it folds nothing;
/// a damaged checkpoint falls back to a full fit, and all of it survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_fit_equals_a_full_refit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    create(&mut client, "inc").await;
    create(&mut client, "full").await;
    let (train, _) = file_batches(&data("train.parquet"), Dtype::F32);
    let half = train.len() / 2;
    let first_rows: u64 = train[..half].iter().map(|b| b.trace_ids.len() as u64).sum();
    for m in ["inc", "full"] {
        ingest(&mut client, m, train[..half].to_vec())
            .await
            .unwrap();
    }
    // Segments: Arrow IPC files any Arrow reader opens, each vector one binary row of the bytes
    // it came in, marked with its type.
    let seg = std::fs::read_dir(dir.path().join("monitors/inc/reference"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "arrow"))
        .expect("a committed segment");
    let reader =
        arrow::ipc::reader::FileReader::try_new(std::fs::File::open(&seg).unwrap(), None).unwrap();
    let schema = reader.schema();
    let vectors = schema.field_with_name("activation").unwrap();
    assert_eq!(
        vectors.data_type(),
        &arrow::datatypes::DataType::FixedSizeBinary(4 * 384)
    );
    assert_eq!(
        vectors.metadata().get("actwatch.dtype").map(String::as_str),
        Some("float32")
    );
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows as u64, first_rows);

    // Nothing to resume yet: an incremental request runs a full fit and says so.
    let (_, r) = fit_with(&mut client, "inc", true).await;
    assert!(!r.incremental);
    assert_eq!(r.rows_folded, first_rows);
    assert!(dir.path().join("monitors/inc/fitter.bin").exists());

    for m in ["inc", "full"] {
        ingest(&mut client, m, train[half..].to_vec())
            .await
            .unwrap();
    }
    let (_, inc) = fit_with(&mut client, "inc", true).await;
    assert!(inc.incremental);
    assert_eq!(
        inc.rows_folded,
        18_000 - first_rows,
        "only the new segment is folded"
    );
    assert_eq!(inc.reference_rows, 18_000);
    assert_eq!(inc.fit_version, 2);
    let (_, full) = fit_with(&mut client, "full", false).await;
    assert!(!full.incremental);
    assert_eq!(full.rows_folded, 18_000);
    assert_eq!(inc.calibration_computations, full.calibration_computations);
    assert_eq!(inc.calibration_fpr, full.calibration_fpr);

    let want = unary_scores(&mut client, "full", "dev_ood_code.parquet").await;
    assert_eq!(want.len(), 500);
    assert_eq!(
        unary_scores(&mut client, "inc", "dev_ood_code.parquet").await,
        want,
        "the incremental fit scores differently from a full refit"
    );

    // After a restart: the report is remembered, and an update with nothing new folds nothing.
    drop(client);
    server.stop().await;
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    let info = client
        .get_monitor(v1::GetMonitorRequest { name: "inc".into() })
        .await
        .unwrap()
        .into_inner();
    let report = info.report.unwrap();
    assert!(report.incremental);
    assert_eq!(report.rows_folded, 18_000 - first_rows);
    let (_, again) = fit_with(&mut client, "inc", true).await;
    assert!(again.incremental);
    assert_eq!(again.rows_folded, 0);
    assert_eq!(
        unary_scores(&mut client, "inc", "dev_ood_code.parquet").await,
        want
    );

    // A damaged checkpoint is never resumed: the fit starts over, with the same result.
    let ck = dir.path().join("monitors/inc/fitter.bin");
    let mut bytes = std::fs::read(&ck).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&ck, bytes).unwrap();
    let (_, repaired) = fit_with(&mut client, "inc", true).await;
    assert!(!repaired.incremental);
    assert_eq!(repaired.rows_folded, 18_000);
    assert_eq!(
        unary_scores(&mut client, "inc", "dev_ood_code.parquet").await,
        want
    );
    drop(client);
    server.stop().await;
}

/// No segment files of unacknowledged ingests are left in a monitor's reference folder.
fn assert_no_temporary_segments(data_dir: &Path, monitor: &str) {
    let leftovers: Vec<_> =
        std::fs::read_dir(data_dir.join("monitors").join(monitor).join("reference"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Seeded synthetic traces: `n` computations, sites "a" (width 8) and "b" (width 4).
fn synthetic(n: usize, seed: u64) -> Vec<(String, Vec<String>, usize, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    let ids: Vec<String> = (0..n).map(|i| format!("c{seed}-{i}")).collect();
    [("a", 8usize), ("b", 4usize)]
        .into_iter()
        .map(|(site, d)| {
            (
                site.to_string(),
                ids.clone(),
                d,
                rng.gaussian_rows(n, d, 0.0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_precise_statuses_while_another_stream_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_batch_rows: 1000,
        max_message_bytes: 1 << 20,
        max_concurrent_streams: 3,
        // 16 traces of site "a" (8 floats each) waiting for site "b"
        max_joint_pending_bytes: 16 * 8 * 4,
        ..Limits::default()
    };
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    create(&mut client, "synth").await;
    create(&mut client, "empty").await;

    // Reference data, site "b" sent as f16 and bf16 to prove decoding.
    let reference: Vec<v1::TraceBatch> = synthetic(600, 1)
        .into_iter()
        .flat_map(|(site, ids, d, v)| {
            let half = ids.len() / 2;
            let (dt1, dt2) = if site == "b" {
                (Dtype::F16, Dtype::Bf16)
            } else {
                (Dtype::F32, Dtype::F32)
            };
            [
                encode_trace_batch(&site, ids[..half].to_vec(), vec![], d, &v[..half * d], dt1),
                encode_trace_batch(&site, ids[half..].to_vec(), vec![], d, &v[half * d..], dt2),
            ]
        })
        .collect();
    let summary = ingest(&mut client, "synth", reference).await.unwrap();
    assert_eq!(summary.rows, 1200);
    assert_eq!(summary.bytes, 600 * 8 * 4 + 600 * 4 * 2);
    let (_, report) = fit(&mut client, "synth").await;
    assert_eq!(report.reference_rows, 1200);

    let score_set = synthetic(20, 2);
    let batch_of = |site: usize, lo: usize, hi: usize| {
        let (s, ids, d, v) = &score_set[site];
        encode_trace_batch(
            s,
            ids[lo..hi].to_vec(),
            (lo as i32..hi as i32).collect(),
            *d,
            &v[lo * d..hi * d],
            Dtype::F32,
        )
    };

    // A well-behaved stream, open throughout.
    let mut good = ScoreStream::open(&mut client, "synth").await.unwrap();
    let t = good.batch(batch_of(0, 0, 10)).await.unwrap();
    assert_eq!(t[3].position, Some(3));
    assert_eq!(t[3].detectors.len(), 2);

    let score = |batch: v1::TraceBatch, monitor: &str| v1::ScoreRequest {
        monitor: monitor.into(),
        batches: vec![batch],
        complete: true,
    };
    let expect =
        |r: Result<tonic::Response<v1::ScoreResponse>, tonic::Status>, code: Code, needle: &str| {
            let s = status_of(r);
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().contains(needle),
                "{:?} lacks {needle:?}",
                s.message()
            );
        };

    // Wrong width for the site.
    let (_, ids, _, v) = &score_set[0];
    let wrong_width = encode_trace_batch("a", ids[..2].to_vec(), vec![], 4, &v[..8], Dtype::F32);
    expect(
        client.score(score(wrong_width.clone(), "synth")).await,
        Code::InvalidArgument,
        "width 8",
    );
    // ... and at ingest, where nothing of the stream is acknowledged or left behind.
    let mut batches = vec![batch_of(0, 10, 12)];
    batches.push(wrong_width);
    let s = status_of(ingest(&mut client, "synth", batches).await);
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let info = client
        .get_monitor(v1::GetMonitorRequest {
            name: "synth".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.reference_rows, 1200);
    assert_no_temporary_segments(dir.path(), "synth");

    // Byte count that does not match the dtype: f16 bytes declared as f32.
    let mut wrong_dtype = batch_of(0, 0, 2);
    wrong_dtype.activations.as_mut().unwrap().dtype = v1::DType::DtypeF16 as i32;
    expect(
        client.score(score(wrong_dtype, "synth")).await,
        Code::InvalidArgument,
        "needs 32 bytes",
    );
    // NaN.
    let mut vals = score_set[0].3[..16].to_vec();
    vals[9] = f32::NAN;
    let nan = encode_trace_batch(
        "a",
        score_set[0].1[..2].to_vec(),
        vec![],
        8,
        &vals,
        Dtype::F32,
    );
    expect(
        client.score(score(nan, "synth")).await,
        Code::InvalidArgument,
        "non-finite",
    );
    // Ragged: shape [rows, cols] that does not match the trace ids.
    let mut ragged = batch_of(0, 0, 4);
    ragged.trace_ids.pop();
    expect(
        client.score(score(ragged, "synth")).await,
        Code::InvalidArgument,
        "3 trace ids for 4 rows",
    );
    let mut three_d = batch_of(0, 0, 4);
    three_d.activations.as_mut().unwrap().shape = vec![4, 2, 4];
    expect(
        client.score(score(three_d, "synth")).await,
        Code::InvalidArgument,
        "[rows, cols]",
    );
    // Unknown monitor; a monitor that is not fitted.
    expect(
        client.score(score(batch_of(0, 0, 2), "nope")).await,
        Code::NotFound,
        "nope",
    );
    expect(
        client.score(score(batch_of(0, 0, 2), "empty")).await,
        Code::FailedPrecondition,
        "not fitted",
    );
    assert_eq!(
        status_of(ScoreStream::open(&mut client, "empty").await).code(),
        Code::FailedPrecondition
    );
    // Too many rows in a batch.
    let big: Vec<f32> = vec![0.5; 1001 * 4];
    let ids: Vec<String> = (0..1001).map(|i| format!("big{i}")).collect();
    let too_many = encode_trace_batch("b", ids, vec![], 4, &big, Dtype::F32);
    expect(
        client.score(score(too_many, "synth")).await,
        Code::ResourceExhausted,
        "max_batch_rows",
    );
    // A message over the size limit, in a stream.
    let huge: Vec<f32> = vec![0.5; 900 * 400];
    let ids: Vec<String> = (0..900).map(|i| format!("huge{i}")).collect();
    let s = status_of(
        ingest(
            &mut client,
            "synth",
            vec![encode_trace_batch(
                "wide",
                ids,
                vec![],
                400,
                &huge,
                Dtype::F32,
            )],
        )
        .await,
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("max_message_bytes"), "{s:?}");
    // The same message in a unary call: tonic refuses it before any handler runs, and the answer
    // is the same status.
    let s = status_of(
        client
            .score(v1::ScoreRequest {
                monitor: "synth".into(),
                batches: vec![encode_trace_batch(
                    "wide",
                    (0..900).map(|i| format!("huge{i}")).collect(),
                    vec![],
                    400,
                    &huge,
                    Dtype::F32,
                )],
                complete: true,
            })
            .await,
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("max_message_bytes"), "{s:?}");
    // Traces of one site only, waiting for the other site of their joint vectors: the 17th is
    // over the limit, which is named; the stream ends
    // (and, ended by the server, gives its permit back).
    let mut lopsided = ScoreStream::open(&mut client, "synth").await.unwrap();
    let s = status_of(lopsided.batch(batch_of(0, 0, 17)).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("max_joint_pending_bytes"), "{s:?}");
    drop(lopsided);

    // Too many concurrent streams: `good` holds one permit, two watchers the others.
    let mut watchers = Vec::new();
    for _ in 0..2 {
        watchers.push(
            client
                .watch_flags(v1::WatchFlagsRequest::default())
                .await
                .unwrap(),
        );
    }
    let s = status_of(client.watch_flags(v1::WatchFlagsRequest::default()).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("max_concurrent_streams"), "{s:?}");
    drop(watchers);

    // The good stream kept working through all of that.
    good.batch(batch_of(1, 0, 10)).await.unwrap();
    let ids: Vec<String> = score_set[0].1[..10].to_vec();
    let results = good.complete(ids.clone()).await;
    assert_eq!(
        results
            .iter()
            .map(|c| c.trace_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    // two sites × (gaussian, knn), and the default joint gaussian
    assert!(results.iter().all(|c| c.traces == 2 && c.slots.len() == 5));
    // Completing a computation twice ends that stream with INVALID_ARGUMENT.
    good.send(stream_scores_request::Event::Complete(
        v1::CompleteComputations {
            trace_ids: vec![ids[0].clone()],
        },
    ))
    .await;
    let s = good.rx.message().await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // Bad names and specs; delete.
    let s = status_of(
        client
            .create_monitor(v1::CreateMonitorRequest {
                name: "../etc".into(),
                spec: None,
            })
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = status_of(
        client
            .create_monitor(v1::CreateMonitorRequest {
                name: "x".into(),
                spec: Some(v1::MonitorSpec {
                    fusion: "median".into(),
                    ..Default::default()
                }),
            })
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    client
        .delete_monitor(v1::DeleteMonitorRequest {
            name: "empty".into(),
        })
        .await
        .unwrap();
    let list = client
        .list_monitors(v1::ListMonitorsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.monitors
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["synth"]
    );
    assert!(!dir.path().join("monitors/empty").exists());

    drop(good);
    drop(client);
    server.stop().await;
}

/// One HTTP/1.1 GET over a plain TCP connection: (status line, headers and body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    (head.to_string(), body.to_string())
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_ingest_scores_flags_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let limits = Limits {
        max_message_bytes: 1 << 20,
        ..Limits::default()
    };
    let server = TestServer::start_with_metrics(dir.path(), limits, Some(metrics_listener)).await;
    let mut client = server.client().await;
    create(&mut client, "synth").await;

    let reference: Vec<v1::TraceBatch> = synthetic(600, 1)
        .into_iter()
        .map(|(site, ids, d, v)| encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
        .collect();
    let summary = ingest(&mut client, "synth", reference).await.unwrap();
    assert_eq!(summary.rows, 1200);
    let (_, report) = fit(&mut client, "synth").await;
    assert_eq!(report.reference_rows, 1200);

    // 20 computations of 2 traces each through Score; one more batch of 5 through StreamScores.
    let batches: Vec<v1::TraceBatch> = synthetic(20, 2)
        .into_iter()
        .map(|(site, ids, d, v)| encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
        .collect();
    let scored = client
        .score(v1::ScoreRequest {
            monitor: "synth".into(),
            batches,
            complete: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scored.computations.len(), 20);
    let flagged = scored.computations.iter().filter(|c| c.flagged).count();
    let mut stream = ScoreStream::open(&mut client, "synth").await.unwrap();
    let (site, ids, d, v) = synthetic(5, 3).swap_remove(0);
    stream
        .batch(encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
        .await
        .unwrap();
    drop(stream);

    // Two rejected calls: NOT_FOUND and INVALID_ARGUMENT.
    let missing = client
        .get_monitor(v1::GetMonitorRequest {
            name: "nope".into(),
        })
        .await;
    assert_eq!(status_of(missing).code(), Code::NotFound);
    let bad = client
        .create_monitor(v1::CreateMonitorRequest {
            name: "bad name".into(),
            spec: None,
        })
        .await;
    assert_eq!(status_of(bad).code(), Code::InvalidArgument);
    // And one refused before any handler runs: an oversized unary request.
    let huge = client
        .score(v1::ScoreRequest {
            monitor: "synth".into(),
            batches: vec![encode_trace_batch(
                "a",
                (0..40_000).map(|i| format!("h{i}")).collect(),
                vec![],
                8,
                &vec![0.5; 40_000 * 8],
                Dtype::F32,
            )],
            complete: true,
        })
        .await;
    assert_eq!(status_of(huge).code(), Code::ResourceExhausted);

    let (head, text) = http_get(metrics_addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let m = |name: &str| sample(&text, &format!("{name}{{monitor=\"synth\"}}"));
    assert_eq!(m("actwatch_ingest_rows_total"), 1200.0);
    assert_eq!(
        m("actwatch_ingest_bytes_total"),
        (600 * 8 * 4 + 600 * 4 * 4) as f64
    );
    assert_eq!(m("actwatch_scored_traces_total"), 45.0);
    assert_eq!(m("actwatch_scored_computations_total"), 20.0);
    assert_eq!(m("actwatch_flags_total"), flagged as f64);
    assert_eq!(m("actwatch_observed_flag_rate"), flagged as f64 / 20.0);
    assert_eq!(
        m("actwatch_target_fpr"),
        actwatch_detect::monitor::DEFAULT_FPR
    );
    let latency = "actwatch_score_latency_seconds";
    assert_eq!(
        sample(&text, &format!("{latency}_count{{rpc=\"Score\"}}")),
        1.0
    );
    assert_eq!(
        sample(&text, &format!("{latency}_count{{rpc=\"StreamScores\"}}")),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("{latency}_bucket{{rpc=\"Score\",le=\"+Inf\"}}")
        ),
        1.0
    );
    let rejected = |code: &str| {
        sample(
            &text,
            &format!("actwatch_rejected_calls_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(rejected("NOT_FOUND"), 1.0);
    assert_eq!(rejected("INVALID_ARGUMENT"), 1.0);
    assert_eq!(rejected("RESOURCE_EXHAUSTED"), 1.0);

    let (head, _) = http_get(metrics_addr, "/elsewhere").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    drop(client);
    server.stop().await;
}

/// The peak virtual memory (`VmPeak`, bytes) of a running process.
fn vm_peak(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPeak in /proc/PID/status");
    kib << 10
}

/// The address space the README says `actwatch serve` runs in on this machine class (2 cores;
/// its measured peak here is 0.74 GiB).
const SERVE_ADDRESS_SPACE: u64 = 2 << 30;

/// The server's address space does not grow with its concurrency (reliability issue: every thread
/// that ran a matrix product kept twice the L3 size the VM reports as scratch for its life, and
/// each call ran on a thread of its own, so 32 concurrent calls reached 35 GB of virtual memory
/// and under an address-space limit 4 concurrent scoring calls aborted the process). Here 32
/// concurrent Score calls of 256 vectors at d = 384, and a fit, run under `ulimit -v`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scoring_runs_under_an_address_space_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProcess::start_with(dir.path(), &[], Some(SERVE_ADDRESS_SPACE)).await;
    let mut client = server.client().await;
    create(&mut client, "wide").await;
    let (d, n) = (384, 3000);
    let mut rng = Rng::new(41);
    let rows = |rng: &mut Rng, prefix: &str, n: usize| {
        let ids = (0..n).map(|i| format!("{prefix}{i}")).collect();
        encode_trace_batch(
            "h",
            ids,
            vec![],
            d,
            &rng.gaussian_rows(n, d, 0.0),
            Dtype::F32,
        )
    };
    let reference = rows(&mut rng, "r", n);
    ingest(&mut client, "wide", vec![reference]).await.unwrap();
    let (_, report) = fit(&mut client, "wide").await;
    assert_eq!(report.reference_rows, n as u64);
    let calls: Vec<_> = (0..32)
        .map(|c| {
            let mut client = client.clone();
            let batch = rows(&mut rng, &format!("q{c}-"), 256);
            tokio::spawn(async move {
                client
                    .score(v1::ScoreRequest {
                        monitor: "wide".into(),
                        batches: vec![batch],
                        complete: true,
                    })
                    .await
            })
        })
        .collect();
    for call in calls {
        let r = call.await.unwrap().expect("a scoring call under the limit");
        assert_eq!(r.get_ref().computations.len(), 256);
    }
    let peak = vm_peak(server.child.id());
    eprintln!("VmPeak {:.2} GiB", peak as f64 / (1u64 << 30) as f64);
    let listed = client
        .list_monitors(v1::ListMonitorsRequest {})
        .await
        .expect("the server is alive")
        .into_inner();
    assert_eq!(listed.monitors.len(), 1);
    drop(client);
    server.sigterm();
    assert!(server.exit_ok().await);
}

/// SIGTERM to the real binary: a fit in progress runs to the end and is installed (its client gets
/// the report), while streams that wait on their clients end with UNAVAILABLE: an ingest stream
/// still sending stores nothing (it was never acknowledged), an open StreamScores stream and a
/// watcher end. The process then exits cleanly, and a restart serves exactly the committed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_acknowledged_work_and_ends_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProcess::start(dir.path()).await;
    let mut client = server.client().await;
    create(&mut client, "m").await;
    let (train, _) = file_batches(&data("train.parquet"), Dtype::F32);
    ingest(&mut client, "m", train.clone()).await.unwrap();
    let (_, first) = fit(&mut client, "m").await;
    assert_eq!(first.fit_version, 1);

    // A watcher, a scoring stream with one batch scored, and an ingest stream still sending.
    let mut watcher = client
        .watch_flags(v1::WatchFlagsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut scores = ScoreStream::open(&mut client, "m").await.unwrap();
    let (code, _) = file_batches(&data("dev_ood_code.parquet"), Dtype::F32);
    scores.batch(code[0].clone()).await.unwrap();
    let (ingest_tx, ingest_rx) = mpsc::channel(4);
    let mut ingest_client = client.clone();
    let open_ingest = tokio::spawn(async move {
        ingest_client
            .ingest_reference(ReceiverStream::new(ingest_rx))
            .await
    });
    for (i, b) in train.iter().take(3).enumerate() {
        ingest_tx
            .send(v1::IngestReferenceRequest {
                monitor: if i == 0 { "m".into() } else { String::new() },
                batch: Some(b.clone()),
                labels: Vec::new(),
            })
            .await
            .unwrap();
    }

    // A refit, under way when the signal arrives.
    let mut refit = client
        .fit(v1::FitRequest {
            monitor: "m".into(),
            incremental: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let progress = refit.message().await.unwrap().unwrap();
    assert!(matches!(
        progress.event,
        Some(fit_progress::Event::Phase(_))
    ));
    server.sigterm();

    let mut report = None;
    while let Some(msg) = refit
        .message()
        .await
        .expect("the fit finishes despite SIGTERM")
    {
        if let Some(fit_progress::Event::Report(r)) = msg.event {
            report = Some(r);
        }
    }
    assert_eq!(report.expect("the fit reports").fit_version, 2);

    let s = status_of(open_ingest.await.unwrap());
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let s = loop {
        match watcher.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watcher ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let s = scores
        .rx
        .message()
        .await
        .expect_err("the scoring stream ends");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    drop((client, scores, ingest_tx));
    assert!(server.exit_ok().await, "actwatch serve exits with status 0");

    // The restart serves the refit and only the committed reference rows; no temporary files.
    let server = ServeProcess::start(dir.path()).await;
    let mut client = server.client().await;
    let info = client
        .get_monitor(v1::GetMonitorRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(info.fitted);
    assert_eq!(info.fit_version, 2);
    assert_eq!(info.reference_rows, 18_000);
    assert_no_temporary_segments(dir.path(), "m");
    drop(client);
    server.sigterm();
    assert!(server.exit_ok().await);
}

/// A watcher that does not read falls behind; once it is more than `flag_buffer` events behind it
/// is cut off with RESOURCE_EXHAUSTED naming the limit, while scoring never waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_is_cut_off_and_scoring_never_waits() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        flag_buffer: 4,
        ..Limits::default()
    };
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    create(&mut client, "m").await;
    let (train, _) = file_batches(&data("train.parquet"), Dtype::F32);
    ingest(&mut client, "m", train).await.unwrap();
    fit(&mut client, "m").await;
    let mut slow = client
        .watch_flags(v1::WatchFlagsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let mut flagged = 0;
    for file in [
        "dev_ood_code.parquet",
        "dev_ood_base64.parquet",
        "dev_ood_non_english.parquet",
    ] {
        let (batches, _) = file_batches(&data(file), Dtype::F32);
        let r = tokio::time::timeout(
            Duration::from_secs(120),
            client.score(v1::ScoreRequest {
                monitor: "m".into(),
                batches,
                complete: true,
            }),
        )
        .await
        .expect("scoring does not wait for a slow watcher")
        .unwrap()
        .into_inner();
        flagged += r.computations.iter().filter(|c| c.flagged).count();
    }
    assert!(flagged > 1000, "{flagged} flagged");

    let mut received = 0;
    let s = loop {
        match slow.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the lagging watcher ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("flag_buffer"), "{s:?}");
    assert!(received < flagged, "{received} of {flagged} delivered");
    drop(client);
    server.stop().await;
}

/// Every size a client controls is refused by a named limit before memory is committed to it, with
/// a short message that quotes client strings only as an excerpt; bad site names are refused; the
/// server stays up and a well-formed ingest afterwards works (reliability issue, "crashes from one
/// request": a 100,000-wide vector, thousands of sites, a 100,000-character site name, a 1 MB id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sizes_are_refused_by_named_limits() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_sites_per_monitor: 3,
        max_fit_bytes: 64 << 20,
        max_ingests_per_monitor: 3,
        ..Limits::default()
    };
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    create(&mut client, "m").await;
    let batch = |site: &str, id: &str, width: usize| {
        encode_trace_batch(
            site,
            vec![id.to_string()],
            vec![],
            width,
            &vec![0.5; width],
            Dtype::F32,
        )
    };
    let refused = |s: tonic::Status, code: Code, needle: &str| {
        assert_eq!(s.code(), code, "{s:?}");
        assert!(
            s.message().contains(needle),
            "{:?} lacks {needle:?}",
            s.message()
        );
        assert!(
            s.message().len() < 300,
            "a long message: {}",
            s.message().len()
        );
    };

    let wide = batch("a", "c0", 100_000);
    let s = status_of(ingest(&mut client, "m", vec![wide]).await);
    refused(s, Code::ResourceExhausted, "max_vector_width");

    let long_site = batch(&"s".repeat(100_000), "c0", 4);
    let s = status_of(ingest(&mut client, "m", vec![long_site]).await);
    refused(s, Code::ResourceExhausted, "max_site_name_bytes");

    for bad in ["../../etc/passwd", "a\nb", "with space"] {
        let s = status_of(ingest(&mut client, "m", vec![batch(bad, "c0", 4)]).await);
        refused(s, Code::InvalidArgument, "invalid site name");
    }

    let long_id = batch("a", &"i".repeat(1 << 20), 4);
    let s = status_of(ingest(&mut client, "m", vec![long_id]).await);
    refused(s, Code::ResourceExhausted, "max_trace_id_bytes");

    // Sites: one stream with one too many stores nothing; three are accepted, and a fourth in a
    // later stream is refused while the known sites keep working.
    let four = (0..4).map(|i| batch(&format!("s{i}"), "c0", 4)).collect();
    let s = status_of(ingest(&mut client, "m", four).await);
    refused(s, Code::ResourceExhausted, "max_sites_per_monitor");
    let info = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            client
                .get_monitor(v1::GetMonitorRequest { name: "m".into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(info(&mut client).await.reference_rows, 0);
    let three = (0..3).map(|i| batch(&format!("s{i}"), "c0", 4)).collect();
    ingest(&mut client, "m", three).await.unwrap();
    let s = status_of(ingest(&mut client, "m", vec![batch("s3", "c1", 4)]).await);
    refused(s, Code::ResourceExhausted, "max_sites_per_monitor");
    ingest(&mut client, "m", vec![batch("s1", "c1", 4)])
        .await
        .unwrap();
    let m = info(&mut client).await;
    assert_eq!((m.sites.len(), m.reference_rows), (3, 4));
    assert_no_temporary_segments(dir.path(), "m");

    // Ingests: two committed, a third is the last one accepted (each stream is listed in
    // state.json and compared by the reference check).
    ingest(&mut client, "m", vec![batch("s2", "c2", 4)])
        .await
        .unwrap();
    let s = status_of(ingest(&mut client, "m", vec![batch("s2", "c3", 4)]).await);
    refused(s, Code::ResourceExhausted, "max_ingests_per_monitor");
    let m = info(&mut client).await;
    assert_eq!((m.ingests.len(), m.reference_rows), (3, 5));
    assert_no_temporary_segments(dir.path(), "m");

    // A fit that would need more memory than max_fit_bytes is refused before it allocates: two
    // rows 4096 wide ask a Gaussian for 5 x 4096^2 doubles (670 MB).
    create(&mut client, "wide").await;
    let rows = encode_trace_batch(
        "w",
        vec!["c0".into(), "c1".into()],
        vec![],
        4096,
        &vec![0.25; 2 * 4096],
        Dtype::F32,
    );
    ingest(&mut client, "wide", vec![rows]).await.unwrap();
    let s = status_of(
        client
            .fit(v1::FitRequest {
                monitor: "wide".into(),
                incremental: false,
                ..Default::default()
            })
            .await,
    );
    refused(s, Code::ResourceExhausted, "max_fit_bytes");
    drop(client);
    server.stop().await;
}

/// A scoring client that keeps its stream open but never reads the results cannot hold a shutdown:
/// once its buffers are full the server's task waits on it, and the shutdown cuts it off after the
/// grace period instead of waiting for it forever (reliability issue, "SIGTERM waits forever on a
/// StreamScores client that never reads").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_scoring_client_that_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        shutdown_grace_seconds: 2,
        ..Limits::default()
    };
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    create(&mut client, "m").await;
    let reference = synthetic(600, 1)
        .into_iter()
        .map(|(site, ids, d, v)| encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
        .collect();
    ingest(&mut client, "m", reference).await.unwrap();
    fit(&mut client, "m").await;

    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::StreamScoresRequest {
        event: Some(stream_scores_request::Event::Monitor("m".into())),
    })
    .await
    .unwrap();
    let unread = client
        .stream_scores(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut rng = Rng::new(3);
    let ids: Vec<String> = (0..4096).map(|i| format!("c{}", i % 100)).collect();
    let batch = encode_trace_batch(
        "a",
        ids,
        vec![],
        8,
        &rng.gaussian_rows(4096, 8, 0.0),
        Dtype::F32,
    );
    // Far more results than the stream's buffers hold (about 300 KB each).
    let feeder = tokio::spawn(async move {
        for _ in 0..200 {
            let event = Some(stream_scores_request::Event::Batch(batch.clone()));
            if tx.send(v1::StreamScoresRequest { event }).await.is_err() {
                break;
            }
        }
        tx
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    server.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    drop((unread, client));
    feeder.abort();
}

/// One damaged monitor never stops the others: at start, a monitor whose `state.json` is
/// unreadable and a stray empty folder under `monitors/` are left unserved (DATA_LOSS, saying why)
/// and reported as damaged by GetMonitor and ListMonitors, every healthy monitor is served, and
/// DeleteMonitor removes a damaged one (reliability issue, "one damaged monitor stops the whole server from starting").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_monitor_is_quarantined_while_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    create(&mut client, "healthy").await;
    create(&mut client, "broken").await;
    create(&mut client, "tampered").await;
    let rows = |n: usize| {
        let ids = (0..n).map(|i| format!("c{i}")).collect();
        vec![encode_trace_batch(
            "a",
            ids,
            vec![],
            4,
            &vec![0.5; 4 * n],
            Dtype::F32,
        )]
    };
    ingest(&mut client, "healthy", rows(3)).await.unwrap();
    ingest(&mut client, "tampered", rows(5)).await.unwrap();
    drop(client);
    server.stop().await;
    let monitors = dir.path().join("monitors");
    std::fs::write(monitors.join("broken").join("state.json"), b"{ not json").unwrap();
    std::fs::create_dir(monitors.join("stray")).unwrap();
    // A monitor whose reference segment disagrees with state.json (here: the segment of another
    // ingest, with other rows, in its place) is quarantined too.
    let segments = |name: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(monitors.join(name).join("reference"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let (ours, theirs) = (segments("tampered"), segments("healthy"));
    assert_eq!((ours.len(), theirs.len()), (1, 1));
    std::fs::copy(&theirs[0], &ours[0]).unwrap();
    // An operator's file in a healthy monitor's reference folder is left alone (and logged).
    let notes = monitors.join("healthy").join("reference").join("notes.txt");
    std::fs::write(&notes, b"mine").unwrap();

    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    let get = |name: &str| v1::GetMonitorRequest { name: name.into() };
    assert_eq!(
        client
            .get_monitor(get("healthy"))
            .await
            .unwrap()
            .into_inner()
            .name,
        "healthy"
    );
    for name in ["broken", "stray", "tampered"] {
        let info = client.get_monitor(get(name)).await.unwrap().into_inner();
        assert!(!info.damaged.is_empty() && !info.fitted, "{info:?}");
        let batch = encode_trace_batch("a", vec!["c".into()], vec![], 4, &[0.5; 4], Dtype::F32);
        let s = status_of(ingest(&mut client, name, vec![batch]).await);
        assert_eq!(s.code(), Code::DataLoss, "{s:?}");
        assert!(s.message().contains("damaged"), "{s:?}");
    }
    assert!(client
        .get_monitor(get("broken"))
        .await
        .unwrap()
        .into_inner()
        .damaged
        .contains("state.json"));
    let why = client
        .get_monitor(get("tampered"))
        .await
        .unwrap()
        .into_inner()
        .damaged;
    assert!(
        why.contains("the segment holds 3 rows, but state.json lists 5"),
        "{why}"
    );
    let listed = client
        .list_monitors(v1::ListMonitorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .monitors;
    let names: Vec<(&str, bool)> = listed
        .iter()
        .map(|m| (m.name.as_str(), m.damaged.is_empty()))
        .collect();
    assert_eq!(
        names,
        [
            ("broken", false),
            ("healthy", true),
            ("stray", false),
            ("tampered", false)
        ]
    );
    client
        .delete_monitor(v1::DeleteMonitorRequest {
            name: "broken".into(),
        })
        .await
        .unwrap();
    assert!(!monitors.join("broken").exists());
    let s = status_of(client.get_monitor(get("broken")).await);
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    create(&mut client, "broken").await;
    drop(client);
    server.stop().await;
}

/// Per-token traces (`tests/data/tokens`: MiniLM's layer 4, one row per token, with positions).
fn token_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tokens")
        .join(name)
}

/// A monitor fitted over gRPC on per-token reference traces flags a span-injected computation
/// streamed token by token before it is complete: in the response to the token at which its
/// running statistic reaches the threshold (mostly the span's first token, or soon after), on
/// WatchFlags, marked partial; the final result is flagged too and names the same position. A
/// computation is flagged early exactly when its final result is flagged (the default monitor
/// aggregates by max, which never decreases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_streamed_token_by_token_is_flagged_before_it_completes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    client
        .create_monitor(v1::CreateMonitorRequest {
            name: "tokens".into(),
            // One calibration for all lengths: the fixture's reference sentences are all short
            // (8 to 10 tokens), so strata could not tell lengths apart; with one stratum every
            // final flag of a monotone aggregation was an early flag.
            spec: Some(v1::MonitorSpec {
                fpr: 0.05,
                length_strata: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let read = ReadOptions::default();
    let (reference, _) = file_batches_with(
        &token_file("train_tokens.parquet"),
        Dtype::F16,
        read.clone(),
    );
    assert!(reference
        .iter()
        .all(|b| b.positions.len() == b.trace_ids.len()));
    ingest(&mut client, "tokens", reference).await.unwrap();
    let (_, report) = fit(&mut client, "tokens").await;
    assert!(report.joint.unwrap().skipped.contains("one site"));
    let mut watcher = client
        .watch_flags(v1::WatchFlagsRequest {
            monitors: vec!["tokens".into()],
            max_p_value: 0.0,
        })
        .await
        .unwrap()
        .into_inner();

    let spans: HashMap<String, (i32, i32)> = {
        let file = std::fs::File::open(token_file("spans.parquet")).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024).unwrap();
        let mut out = HashMap::new();
        for b in reader {
            let b = b.unwrap();
            let ids = b.column_by_name("id").unwrap().as_string::<i32>().clone();
            let int = |name: &str| {
                b.column_by_name(name)
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .clone()
            };
            let (start, n) = (int("span_start"), int("n_tokens"));
            for i in 0..b.num_rows() {
                out.insert(ids.value(i).to_string(), (start.value(i), n.value(i)));
            }
        }
        out
    };

    let mut early_events = 0;
    let mut span_early = 0;
    let mut span_early_in_span = 0;
    for file in ["spans_tokens.parquet", "dev_id_tokens.parquet"] {
        // one batch per token, computations in file order
        let mut ids: Vec<String> = Vec::new();
        let mut tokens: HashMap<String, Vec<v1::TraceBatch>> = HashMap::new();
        for batch in TraceReader::open(&[token_file(file)], read.clone()).unwrap() {
            let batch = batch.unwrap();
            let positions = batch.positions.clone().expect("the fixture has positions");
            for (i, id) in batch.trace_ids.iter().enumerate() {
                let v = batch.row_vector(i);
                let toks = tokens.entry(id.clone()).or_insert_with(|| {
                    ids.push(id.clone());
                    Vec::new()
                });
                toks.push(encode_trace_batch(
                    &batch.sites[i],
                    vec![id.clone()],
                    vec![positions[i]],
                    v.len(),
                    v,
                    Dtype::F16,
                ));
            }
        }
        let mut stream = ScoreStream::open(&mut client, "tokens").await.unwrap();
        for id in &ids {
            let mut early: Option<(i32, v1::ComputationScore)> = None;
            let toks = &tokens[id];
            for t in toks {
                let position = t.positions[0];
                let out = stream.batch_and_flags(t.clone()).await.unwrap();
                for e in out.early_flags {
                    assert!(early.is_none(), "{id}: flagged early twice");
                    assert_eq!(&e.trace_id, id);
                    early = Some((position, e));
                }
            }
            let fin = stream.complete(vec![id.clone()]).await.pop().unwrap();
            assert!(!fin.partial);
            assert_eq!(
                early.is_some(),
                fin.flagged,
                "{id}: early flag vs final flag"
            );
            let Some((at, e)) = early else {
                assert_eq!(fin.flagged_at, None);
                continue;
            };
            early_events += 1;
            assert!(e.partial && e.flagged, "{e:?}");
            // the flag came in the response to the very token that crossed the threshold
            assert_eq!(e.flagged_at, Some(i64::from(at)), "{id}");
            assert_eq!(fin.flagged_at, e.flagged_at, "{id}");
            assert!(e.traces <= fin.traces && e.p_value >= fin.p_value, "{id}");
            if let Some(&(start, n)) = spans.get(id) {
                assert_eq!(n as usize, toks.len());
                span_early += 1;
                if at >= start && at < n - 1 {
                    span_early_in_span += 1;
                }
            }
        }
    }
    eprintln!(
        "span-injected: {span_early} of {} flagged before completion, {span_early_in_span} at or \
         after the first injected token",
        spans.len()
    );
    assert!(
        span_early * 4 >= spans.len() * 3,
        "{span_early} of {} spans flagged",
        spans.len()
    );
    assert!(
        span_early_in_span * 4 >= span_early * 3,
        "{span_early_in_span} of {span_early}"
    );
    // every early flag reached the watcher, marked partial (final flags come too)
    let mut partial = 0;
    while partial < early_events {
        let ev = tokio::time::timeout(Duration::from_secs(10), watcher.message())
            .await
            .expect("every early flag reaches the watcher")
            .unwrap()
            .expect("the watch stream is open");
        let c = ev.computation.unwrap();
        assert!(c.flagged && c.flagged_at.is_some(), "{c:?}");
        partial += usize::from(c.partial);
    }
}

fn provenance(pairs: &[(&str, &str)]) -> v1::Provenance {
    let mut p = v1::Provenance::default();
    for &(field, value) in pairs {
        let slot = match field {
            "model" => &mut p.model,
            "revision" => &mut p.revision,
            "capture" => &mut p.capture,
            "pooling" => &mut p.pooling,
            "dtype" => &mut p.dtype,
            _ => panic!("no field {field}"),
        };
        *slot = value.to_string();
    }
    p
}

async fn info(client: &mut Client, name: &str) -> v1::MonitorInfo {
    client
        .get_monitor(v1::GetMonitorRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// 20 synthetic traces of site "a", declaring `declared`.
fn probe(declared: Option<v1::Provenance>) -> v1::TraceBatch {
    let (site, ids, d, values) = synthetic(20, 9).remove(0);
    assert_eq!(site, "a");
    let mut b = encode_trace_batch(&site, ids, Vec::new(), d, &values, Dtype::F32);
    b.provenance = declared;
    b
}

async fn score_probe(
    client: &mut Client,
    monitor: &str,
    declared: Option<v1::Provenance>,
) -> Result<v1::ScoreResponse, tonic::Status> {
    client
        .score(v1::ScoreRequest {
            monitor: monitor.into(),
            batches: vec![probe(declared)],
            complete: false,
        })
        .await
        .map(|r| r.into_inner())
}

fn p_values(r: &v1::ScoreResponse) -> Vec<f64> {
    r.traces.iter().map(|t| t.p_value).collect()
}

/// On monitor "strict": undeclared and agreeing batches score alike, a conflicting one is
/// refused naming site, field and values. Returns the p-values.
async fn check_strict_provenance(
    client: &mut Client,
    reference: &v1::Provenance,
    conflicting: &v1::Provenance,
) -> Vec<f64> {
    let undeclared = score_probe(client, "strict", None).await.unwrap();
    assert!(undeclared.provenance_warnings.is_empty());
    let same = score_probe(client, "strict", Some(reference.clone()))
        .await
        .unwrap();
    assert_eq!(p_values(&same), p_values(&undeclared));
    let st = status_of(score_probe(client, "strict", Some(conflicting.clone())).await);
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    for needle in [
        "site \"a\"",
        "dtype \"bfloat16\"",
        "\"float32\"",
        "\"warn\"",
    ] {
        assert!(st.message().contains(needle), "{needle}: {}", st.message());
    }
    p_values(&undeclared)
}

/// Synthetic two-site batches (sites "a" and "b"), site "a" declaring `declared`.
fn declared_batches(n: usize, seed: u64, declared: &v1::Provenance) -> Vec<v1::TraceBatch> {
    synthetic(n, seed)
        .into_iter()
        .map(|(site, ids, d, values)| {
            let mut b = encode_trace_batch(&site, ids, Vec::new(), d, &values, Dtype::F32);
            if site == "a" {
                b.provenance = Some(declared.clone());
            }
            b
        })
        .collect()
}

/// A monitor records what its reference batches declared; reference batches that contradict it
/// are refused at ingest; scored batches that contradict it are refused (the default policy) or
/// scored with a warning (policy "warn"), with the same p-values as undeclared ones; undeclared
/// batches pass; all of it survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_provenance_is_refused_or_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    let reference = provenance(&[
        ("model", "synthetic-net"),
        ("revision", "abc123"),
        ("capture", "actwatch_client.hooks:output"),
        ("pooling", "mean"),
        ("dtype", "float32"),
    ]);
    for (name, policy) in [("strict", ""), ("lenient", "warn")] {
        client
            .create_monitor(v1::CreateMonitorRequest {
                name: name.into(),
                spec: Some(v1::MonitorSpec {
                    provenance_policy: policy.into(),
                    detectors: vec!["gaussian".into()],
                    joint: "none".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        // One stream declares everything, a later one only part of it: both agree.
        ingest(&mut client, name, declared_batches(300, 1, &reference))
            .await
            .unwrap();
        let partial = provenance(&[("model", "synthetic-net")]);
        ingest(&mut client, name, declared_batches(300, 2, &partial))
            .await
            .unwrap();
    }
    let before = info(&mut client, "strict").await;
    let site = |i: &v1::MonitorInfo, s: &str| i.sites.iter().find(|x| x.name == s).unwrap().clone();
    assert_eq!(site(&before, "a").provenance, Some(reference.clone()));
    assert_eq!(
        site(&before, "b").provenance,
        Some(v1::Provenance::default())
    );
    assert_eq!(before.spec.as_ref().unwrap().provenance_policy, "refuse");

    // A reference batch read through another capture path is refused, and nothing of its stream
    // is stored.
    let other_path = provenance(&[("model", "synthetic-net"), ("capture", "transformer_lens")]);
    let st = status_of(ingest(&mut client, "strict", declared_batches(50, 3, &other_path)).await);
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    for needle in [
        "site \"a\"",
        "capture \"transformer_lens\"",
        "actwatch_client.hooks:output",
    ] {
        assert!(st.message().contains(needle), "{needle}: {}", st.message());
    }
    let after = info(&mut client, "strict").await;
    assert_eq!(after.reference_rows, before.reference_rows);
    // Hostile values are refused before anything is decoded or stored.
    let long = "x".repeat(actwatch_core::MAX_PROVENANCE_VALUE_BYTES + 1);
    let st = status_of(
        ingest(
            &mut client,
            "strict",
            declared_batches(5, 4, &provenance(&[("model", &long)])),
        )
        .await,
    );
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("over the limit of 256"),
        "{}",
        st.message()
    );

    for name in ["strict", "lenient"] {
        fit(&mut client, name).await;
    }
    let bf16 = provenance(&[("model", "synthetic-net"), ("dtype", "bfloat16")]);
    let expected = check_strict_provenance(&mut client, &reference, &bf16).await;

    // Policy "warn": scored, the same p-values, and said so once per site.
    let warned = score_probe(&mut client, "lenient", Some(bf16.clone()))
        .await
        .unwrap();
    assert_eq!(p_values(&warned), expected, "a warning changes no score");
    assert_eq!(
        warned.provenance_warnings,
        vec![v1::ProvenanceWarning {
            site: "a".into(),
            field: "dtype".into(),
            declared: "bfloat16".into(),
            recorded: "float32".into(),
        }]
    );
    let mut stream = ScoreStream::open(&mut client, "lenient").await.unwrap();
    let t = stream
        .batch_and_flags(probe(Some(bf16.clone())))
        .await
        .unwrap();
    assert_eq!(t.provenance_warnings.len(), 1);
    let t = stream.batch_and_flags(probe(None)).await.unwrap();
    assert!(t.provenance_warnings.is_empty());
    drop(stream);

    // The recorded provenance is in state.json and in the fitted artifact: it survives a restart.
    server.stop().await;
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    let restarted = info(&mut client, "strict").await;
    assert_eq!(site(&restarted, "a").provenance, Some(reference.clone()));
    let manifest =
        actwatch_io::artifact::read_manifest(&dir.path().join("monitors/strict/fitted")).unwrap();
    let a = manifest.sites.iter().find(|s| s.name == "a").unwrap();
    assert_eq!(
        a.provenance.capture.as_deref(),
        Some("actwatch_client.hooks:output")
    );
    assert_eq!(
        check_strict_provenance(&mut client, &reference, &bf16).await,
        expected
    );
    server.stop().await;
}

/// A spec with more detectors than a fit can afford is refused at create, naming the limit; a
/// status never echoes more than `MAX_STATUS_MESSAGE_BYTES` of the client's input back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_specs_are_refused_at_create_and_echoes_are_capped() {
    use actwatch_server::MAX_STATUS_MESSAGE_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let client = server.client().await;
    let create = |detectors: Vec<String>| {
        let mut c = client.clone();
        async move {
            c.create_monitor(v1::CreateMonitorRequest {
                name: "hostile".into(),
                spec: Some(v1::MonitorSpec {
                    detectors,
                    ..Default::default()
                }),
            })
            .await
        }
    };
    // 17 distinct Gaussians: each would hold its own statistics at every site
    let many: Vec<String> = (0..17)
        .map(|i| format!("gaussian:shrinkage=0.{i:02}"))
        .collect();
    let st = status_of(create(many).await);
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("over the limit of 16"),
        "{}",
        st.message()
    );
    // a 1 MB detector name is named in the error, cut
    let st = status_of(create(vec!["y".repeat(1 << 20)]).await);
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().starts_with("invalid monitor spec"),
        "{}",
        &st.message()[..60]
    );
    assert!(
        st.message().len() <= MAX_STATUS_MESSAGE_BYTES + 64,
        "{}",
        st.message().len()
    );
    assert!(st.message().ends_with("more bytes cut)"));
    // specs that could never fit, or only at absurd cost, are refused at create, naming the bound
    for (spec, needle) in [
        ("knn:k=1000000", "k must be in 1..=1024"),
        ("knn:m=100000", "hnsw_m must be in 2..=256"),
        (
            "knn:ef_search=10000000",
            "hnsw_ef_search must be in 1..=65536",
        ),
        (
            "knn:ef_construction=10000000",
            "hnsw_ef_construction must be in 1..=65536",
        ),
    ] {
        let st = status_of(create(vec![spec.into()]).await);
        assert_eq!(st.code(), Code::InvalidArgument, "{spec}: {st:?}");
        assert!(st.message().contains(needle), "{spec}: {}", st.message());
    }
    let st = status_of(create(vec!["knn:k=5".into(), "knn:k=5".into()]).await);
    assert!(st.message().contains("listed twice"), "{}", st.message());
    // and the server is fine
    let ok = create(vec!["gaussian".into()]).await.unwrap().into_inner();
    assert_eq!(ok.name, "hostile");
    server.stop().await;
}

// ---- Concept probes over gRPC (issue 13) ----

fn concepts(name: &str) -> PathBuf {
    minilm::dir().join("../concepts").join(name)
}

/// The concept file's batches (as `file_batches`) with each row's label (`concept` = 1), of the
/// computations `keep` wants.
fn labelled_batches(path: &Path, keep: impl Fn(&str) -> bool) -> Vec<(v1::TraceBatch, Vec<bool>)> {
    let read = ReadOptions {
        keep_other_columns: true,
        ..minilm_read_options()
    };
    let mut out = Vec::new();
    for batch in TraceReader::open(&[path.to_path_buf()], read).unwrap() {
        let batch = batch.unwrap();
        let labels = batch.labels("concept").unwrap();
        for (site, rows) in batch.site_groups() {
            let rows: Vec<usize> = rows
                .into_iter()
                .filter(|&r| keep(&batch.trace_ids[r]))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let v = batch.gather(&rows).unwrap();
            let ids = rows.iter().map(|&r| batch.trace_ids[r].clone()).collect();
            out.push((
                encode_trace_batch(&site, ids, Vec::new(), v.dim(), v.as_slice(), Dtype::F32),
                rows.iter().map(|&r| labels[r]).collect(),
            ));
        }
    }
    out
}

/// Per computation, the probe's (p-value, flagged, verdict) from a unary Score of `file`.
async fn probe_scores(
    client: &mut Client,
    monitor: &str,
    file: &Path,
) -> HashMap<String, (f64, bool, String)> {
    let (batches, _) = file_batches(file, Dtype::F32);
    let r = client
        .score(v1::ScoreRequest {
            monitor: monitor.into(),
            batches,
            complete: true,
        })
        .await
        .unwrap()
        .into_inner();
    r.computations
        .into_iter()
        .map(|c| {
            let p = &c.probes[0];
            (
                c.trace_id.clone(),
                (p.p_value, p.flagged, p.verdict.clone()),
            )
        })
        .collect()
}

/// Labelled examples ingested over gRPC fit a probe that scores exactly as the batch pipeline
/// on the served artifact; a probe flag reaches a watcher with the question that raised it and
/// is found by QueryScores; an incremental fit with more examples equals a full one; a restart
/// gives the same answers; labels a monitor cannot take are refused and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concept_probes_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    // (Every dev computation may be flagged, by one question or another: the watcher must hold
    // them all, since it reads only after the scoring call.)
    let limits = Limits {
        flag_buffer: 4096,
        ..Limits::default()
    };
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let server =
        TestServer::start_with_metrics(dir.path(), limits.clone(), Some(metrics_listener)).await;
    let mut client = server.client().await;
    // Two ingests of labelled examples: most computations first, the rest later.
    let first = |id: &str| actwatch_core::split_unit(1, id) < 0.7;
    let examples = labelled_batches(&concepts("train.parquet"), first);
    let later = labelled_batches(&concepts("train.parquet"), |id| !first(id));

    // Labels on a monitor without probes are refused.
    create(&mut client, "plain").await;
    let s = status_of(ingest_labelled(&mut client, "plain", examples[..1].to_vec()).await);
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("no probes"), "{s:?}");

    let spec = v1::MonitorSpec {
        detectors: vec!["gaussian".into()],
        joint: "none".into(),
        probes: vec!["harm:defer_fpr=0.05".into()],
        ..Default::default()
    };
    let bad = client
        .create_monitor(v1::CreateMonitorRequest {
            name: "bad".into(),
            spec: Some(v1::MonitorSpec {
                probes: vec!["anomaly".into()],
                ..spec.clone()
            }),
        })
        .await;
    let s = status_of(bad);
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let info = client
        .create_monitor(v1::CreateMonitorRequest {
            name: "c".into(),
            spec: Some(spec),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.spec.unwrap().probes, ["harm:defer_fpr=0.05"]);
    let (train, _) = file_batches(&data("train.parquet"), Dtype::F32);
    ingest(&mut client, "c", train).await.unwrap();

    // A label count that is neither 1 nor the rows, and one computation labelled both ways in
    // one stream: refused, nothing of the stream stored.
    let (b, l) = examples[0].clone();
    let s =
        status_of(ingest_labelled(&mut client, "c", vec![(b.clone(), vec![true, false])]).await);
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("one per row"), "{s:?}");
    let flipped: Vec<bool> = l.iter().map(|x| !x).collect();
    let s = status_of(
        ingest_labelled(&mut client, "c", vec![(b.clone(), l.clone()), (b, flipped)]).await,
    );
    assert!(s.message().contains("labelled both"), "{s:?}");
    assert_eq!(info_rows(&mut client, "c").await, (18_000, 0));

    let n_first: u64 = examples.iter().map(|(_, l)| l.len() as u64).sum();
    let summary = ingest_labelled(&mut client, "c", examples.clone())
        .await
        .unwrap();
    assert_eq!(summary.example_rows, n_first);
    assert_eq!(summary.total_example_rows, n_first);
    assert_eq!(
        summary.total_rows, 18_000,
        "examples are not reference rows"
    );
    let (_, report) = fit(&mut client, "c").await;
    let probe = &report.probes[0];
    assert_eq!(probe.name, "harm");
    assert_eq!(probe.kind, "diff_means");
    assert!(
        probe.heldout_positives > 0 && probe.recall.unwrap() > 0.3,
        "{probe:?}"
    );
    assert!(probe.deferred_benign.is_some());

    // The served probe scores exactly as the batch pipeline on the served artifact.
    let dev = concepts("dev.parquet");
    let (artifact, _) = load_monitor(&dir.path().join("monitors/c/fitted")).unwrap();
    let offline = score_computations(
        &artifact,
        std::slice::from_ref(&dev),
        &minilm_read_options(),
        &NoProgress,
    )
    .unwrap();
    let mut watcher = client
        .watch_flags(v1::WatchFlagsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let served = probe_scores(&mut client, "c", &dev).await;
    assert_eq!(served.len(), offline.ids.len());
    for (id, r) in offline.ids.iter().zip(&offline.results) {
        let (p, flagged, verdict) = &served[id];
        assert_eq!(*p, r.probes[0].p_value, "{id}");
        assert_eq!(*flagged, r.probes[0].flagged);
        assert_eq!(verdict, r.probes[0].verdict());
    }
    let probe_flagged = served.values().filter(|v| v.1).count();
    assert!(probe_flagged > 50, "{probe_flagged} flagged by the probe");

    // Every flag reaches the watcher, saying which question raised it.
    let mut raised_by_probe = 0;
    while raised_by_probe < probe_flagged {
        let ev = tokio::time::timeout(Duration::from_secs(30), watcher.message())
            .await
            .expect("flags reach the watcher")
            .unwrap()
            .unwrap();
        let c = ev.computation.unwrap();
        let by_probe = ev.raised_by.contains(&"harm".to_string());
        assert_eq!(by_probe, served[&c.trace_id].1, "{}", c.trace_id);
        assert_eq!(ev.raised_by.contains(&"anomaly".to_string()), c.flagged);
        raised_by_probe += usize::from(by_probe);
    }
    let q = client
        .query_scores(v1::QueryScoresRequest {
            monitor: "c".into(),
            flagged_only: true,
            flagged_by: "harm".into(),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.results.len(), probe_flagged);
    assert!(q.results.iter().all(|c| c.probes[0].flagged));
    let (_, text) = http_get(metrics_addr, "/metrics").await;
    let count = |s: &str| sample(&text, &format!("{s}{{monitor=\"c\"}}")) as usize;
    assert_eq!(count("actwatch_probe_flags_total"), probe_flagged);

    // More examples: an incremental fit equals a full one.
    ingest_labelled(&mut client, "c", later.clone())
        .await
        .unwrap();
    let (_, inc) = fit_with(&mut client, "c", true).await;
    assert!(inc.incremental);
    let after_inc = probe_scores(&mut client, "c", &dev).await;
    let (_, full) = fit_with(&mut client, "c", false).await;
    assert!(!full.incremental);
    assert_eq!(inc.probes, full.probes);
    let after_full = probe_scores(&mut client, "c", &dev).await;
    assert_eq!(after_inc, after_full);

    // A restart serves the same probe.
    drop(watcher);
    drop(client);
    server.stop().await;
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    let info = client
        .get_monitor(v1::GetMonitorRequest { name: "c".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.report.unwrap().probes, full.probes);
    assert_eq!(info.example_rows, 3 * 1220);
    assert_eq!(probe_scores(&mut client, "c", &dev).await, after_full);
    drop(client);
    server.stop().await;
}

/// (reference rows, labelled example rows) of a monitor.
async fn info_rows(client: &mut Client, name: &str) -> (u64, u64) {
    let i = client
        .get_monitor(v1::GetMonitorRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    (i.reference_rows, i.example_rows)
}

fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

/// A client of a server started with `[tls]` (mutual) and `[[tokens]]`: TLS with the test CA,
/// the client certificate when `client_cert`, and `authorization: Bearer <token>` when `token`.
async fn secure_client(
    addr: &str,
    client_cert: bool,
    token: Option<&str>,
) -> Result<
    v1::activation_monitor_client::ActivationMonitorClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor,
        >,
    >,
    tonic::transport::Error,
> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let pem = |name: &str| std::fs::read(tls_file(name)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem("ca.pem")))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(pem("client.pem"), pem("client.key")));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let header = token.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::AsciiMetadataValue>()
            .unwrap()
    });
    Ok(
        v1::activation_monitor_client::ActivationMonitorClient::with_interceptor(
            channel,
            move |mut request: tonic::Request<()>| {
                if let Some(h) = &header {
                    request.metadata_mut().insert("authorization", h.clone());
                }
                Ok(request)
            },
        )
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20),
    )
}

/// Access control over real TLS on loopback (reliability and security issue: "no TLS, no
/// authentication; any client can delete any monitor or poison one; data files 0644"). The real
/// binary with mutual TLS and two tokens: no token or a wrong one is UNAUTHENTICATED, a read token
/// may query and score but not create, ingest, fit or delete (PERMISSION_DENIED, nothing
/// changed), an admin token may do everything, health answers anyone, a client without a
/// certificate or without TLS gets no answer at all; every file the server wrote is its owner's
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tokens_and_roles_guard_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (admin_token, read_token) = ("admin-token-0123456789", "read-token-9876543210");
    let config = dir.path().join("actwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\n\
             [[tokens]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n\n\
             [[tokens]]\nname = \"dashboard\"\nrole = \"read\"\nsha256 = \"{}\"\n",
            tls_file("server.pem"),
            tls_file("server.key"),
            tls_file("ca.pem"),
            actwatch_server::token_digest(admin_token),
            actwatch_server::token_digest(read_token),
        ),
    )
    .unwrap();
    let server =
        ServeProcess::start_with(&data, &["--config", config.to_str().unwrap()], None).await;
    let addr = server.addr.clone();
    let list = v1::ListMonitorsRequest {};

    let mut anonymous = secure_client(&addr, true, None).await.unwrap();
    let s = status_of(anonymous.list_monitors(list).await);
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let mut wrong = secure_client(&addr, true, Some("not-a-token"))
        .await
        .unwrap();
    let s = status_of(wrong.list_monitors(list).await);
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = status_of(
        wrong
            .delete_monitor(v1::DeleteMonitorRequest { name: "m".into() })
            .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    // The admin builds a monitor.
    let mut admin = secure_client(&addr, true, Some(admin_token)).await.unwrap();
    admin
        .create_monitor(v1::CreateMonitorRequest {
            name: "m".into(),
            spec: None,
        })
        .await
        .unwrap();
    let batches = |seed: u64| -> Vec<v1::IngestReferenceRequest> {
        synthetic(600, seed)
            .into_iter()
            .enumerate()
            .map(|(i, (site, ids, d, v))| v1::IngestReferenceRequest {
                monitor: if i == 0 { "m".into() } else { String::new() },
                batch: Some(encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32)),
                labels: vec![],
            })
            .collect()
    };
    admin
        .ingest_reference(tokio_stream::iter(batches(1)))
        .await
        .unwrap();
    let mut progress = admin
        .fit(v1::FitRequest {
            monitor: "m".into(),
            incremental: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut fitted = false;
    while let Some(p) = progress.message().await.unwrap() {
        fitted |= matches!(p.event, Some(fit_progress::Event::Report(_)));
    }
    assert!(fitted);

    // The reader queries and scores, and is refused everything that changes a monitor.
    let mut reader = secure_client(&addr, true, Some(read_token)).await.unwrap();
    let listed = reader.list_monitors(list).await.unwrap().into_inner();
    assert_eq!(listed.monitors.len(), 1);
    let score = v1::ScoreRequest {
        monitor: "m".into(),
        batches: synthetic(5, 9)
            .into_iter()
            .map(|(site, ids, d, v)| encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
            .collect(),
        complete: true,
    };
    let scored = reader.score(score).await.unwrap().into_inner();
    assert_eq!(scored.computations.len(), 5);
    let denied = |s: tonic::Status, rpc: &str| {
        assert_eq!(s.code(), Code::PermissionDenied, "{rpc}: {s:?}");
        assert!(
            s.message().contains(rpc) && s.message().contains("dashboard"),
            "{s:?}"
        );
    };
    denied(
        status_of(
            reader
                .delete_monitor(v1::DeleteMonitorRequest { name: "m".into() })
                .await,
        ),
        "DeleteMonitor",
    );
    denied(
        status_of(
            reader
                .create_monitor(v1::CreateMonitorRequest {
                    name: "n".into(),
                    spec: None,
                })
                .await,
        ),
        "CreateMonitor",
    );
    denied(
        status_of(
            reader
                .ingest_reference(tokio_stream::iter(batches(2)))
                .await,
        ),
        "IngestReference",
    );
    denied(
        status_of(
            reader
                .fit(v1::FitRequest {
                    monitor: "m".into(),
                    incremental: false,
                    ..Default::default()
                })
                .await,
        ),
        "Fit",
    );
    let info = admin
        .get_monitor(v1::GetMonitorRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.reference_rows, 1200, "a refused ingest stored nothing");
    assert_eq!(
        admin
            .list_monitors(list)
            .await
            .unwrap()
            .into_inner()
            .monitors
            .len(),
        1,
        "a refused create or delete changed nothing"
    );

    // Health answers without a token (orchestrators probe it).
    {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let pem = |name: &str| std::fs::read(tls_file(name)).unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem("ca.pem")))
                    .domain_name("localhost")
                    .identity(Identity::from_pem(pem("client.pem"), pem("client.key"))),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "actwatch.v1.ActivationMonitor".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    // No client certificate (mutual TLS) or no TLS: no call goes through, even with a token.
    let without_cert = match secure_client(&addr, false, Some(admin_token)).await {
        Err(_) => None,
        Ok(mut c) => Some(status_of(c.list_monitors(list).await)),
    };
    if let Some(s) = without_cert {
        // TLS 1.3: the client's handshake ends before the server checks its (absent) certificate;
        // the server then closes the connection, a transport error to the client (which one
        // depends on timing: a reset, a broken pipe, a cancelled request), never an answer.
        assert!(
            matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{s:?}"
        );
    }
    let plaintext = async {
        let mut c = v1::activation_monitor_client::ActivationMonitorClient::connect(format!(
            "http://{addr}"
        ))
        .await?;
        c.list_monitors(list)
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)
    };
    let plaintext = tokio::time::timeout(Duration::from_secs(20), plaintext)
        .await
        .expect("a plaintext client gets an answer or an error, not a hang");
    assert!(plaintext.is_err(), "a plaintext call went through");

    // The audit log: who did what to which monitor, with the data's digest; a failed admin call
    // too; nothing for the calls refused before any handler (they changed nothing).
    let status = admin
        .create_monitor(v1::CreateMonitorRequest {
            name: "bad name".into(),
            spec: None,
        })
        .await;
    assert_eq!(status_of(status).code(), Code::InvalidArgument);
    let audit = std::fs::read_to_string(data.join(actwatch_server::AUDIT_FILE)).unwrap();
    let entries: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Vec<(String, String, String, String)> = entries
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("action"), s("principal"), s("monitor"), s("outcome"))
        })
        .collect();
    let row = |a: &str, m: &str, o: &str| (a.into(), "ops".into(), m.into(), o.into());
    assert_eq!(
        summary,
        [
            row("create", "m", "OK"),
            row("ingest", "m", "OK"),
            row("fit", "m", "OK"),
            row("create", "bad name", "INVALID_ARGUMENT"),
        ],
        "{audit}"
    );
    let ingest = &entries[1];
    assert_eq!(ingest["rows"], 1200);
    assert_eq!(ingest["role"], "admin");
    assert_eq!(ingest["sha256"].as_str().unwrap().len(), 64);
    assert!(ingest["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(ingest["at_unix_ms"].as_i64().unwrap() > 1_700_000_000_000);
    assert_eq!(entries[2]["fit_version"], 1);
    assert!(entries[3]["error"].as_str().unwrap().contains("bad name"));

    // Files 0600, directories 0700.
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![data.clone()];
    let mut files = 0;
    while let Some(p) = stack.pop() {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        if p.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", p.display());
            files += 1;
        }
    }
    assert!(files > 3, "the server wrote its files ({files})");

    assert_eq!(
        admin
            .list_monitors(list)
            .await
            .unwrap()
            .into_inner()
            .monitors
            .len(),
        1,
        "the server is alive"
    );
    drop((anonymous, wrong, admin, reader));
    server.sigterm();
    assert!(server.exit_ok().await);
}

/// Beyond loopback the binary refuses to serve without TLS and tokens, unless told to; then it
/// warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_needs_tls_and_tokens_or_an_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let any = format!("0.0.0.0:{port}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actwatch"))
        .args([
            "serve",
            "--listen",
            &any,
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen") && stderr.contains("--allow-insecure"),
        "{stderr}"
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_actwatch"))
        .args([
            "serve",
            "--listen",
            &any,
            "--metrics-listen",
            "off",
            "--allow-insecure",
            "--data-dir",
        ])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut served = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = {
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{err}");
        err
    };
    assert!(served, "{out}");
    assert!(
        out.contains("WARN") && out.contains("--allow-insecure"),
        "{out}"
    );
}

/// One client cannot starve the others (reliability issue: "one client holding 64 idle WatchFlags
/// streams makes every other client's Fit, ingest and scoring fail; idle connections are never
/// closed; 16 idle connections delay /metrics by 5 s each"). A client (one connection) is
/// refused beyond `max_streams_per_client` naming it, while another client still watches,
/// ingests and fits; a slot comes back when a stream ends; a connection that says nothing is
/// closed after `handshake_timeout_seconds`; and /metrics answers at once beside 20 silent
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_starve_the_others() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_concurrent_streams: 8,
        max_streams_per_client: 2,
        handshake_timeout_seconds: 1,
        ..Limits::default()
    };
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let server = TestServer::start_with_metrics(dir.path(), limits, Some(metrics_listener)).await;
    let mut greedy = server.client().await;
    let watch = || v1::WatchFlagsRequest::default();
    let mut held = vec![
        greedy.watch_flags(watch()).await.unwrap(),
        greedy.watch_flags(watch()).await.unwrap(),
    ];
    let s = status_of(greedy.watch_flags(watch()).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("max_streams_per_client"), "{s:?}");

    // Another client, on its own connection, is not affected.
    let mut other = server.client().await;
    let _watching = other.watch_flags(watch()).await.unwrap();
    create(&mut other, "m").await;
    let reference = synthetic(600, 4)
        .into_iter()
        .map(|(site, ids, d, v)| encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
        .collect();
    ingest(&mut other, "m", reference).await.unwrap();
    let (_, report) = fit(&mut other, "m").await;
    assert_eq!(report.reference_rows, 1200);

    // A stream that ends gives its slot back.
    drop(held.pop());
    let mut reopened = None;
    for _ in 0..100 {
        match greedy.watch_flags(watch()).await {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(s) => {
                assert!(s.message().contains("max_streams_per_client"), "{s:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        reopened.is_some(),
        "the ended stream's slot never came back"
    );

    // A connection that sends nothing is closed after the handshake timeout.
    // (The server speaks first, its HTTP/2 settings: read until it closes.)
    let mut silent = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut sink))
        .await
        .expect("the server closes a silent connection");
    assert!(sink.len() < 1024, "{closed:?}, {} bytes", sink.len());

    // Silent connections cannot keep a scrape waiting.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(metrics_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (head, body) =
        tokio::time::timeout(Duration::from_secs(3), http_get(metrics_addr, "/metrics"))
            .await
            .expect("/metrics answers beside silent connections");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("actwatch_rejected_calls_total"), "{body}");
    drop((idle, held, reopened, greedy, other));
    server.stop().await;
}

/// The computations of `path` dealt into `parts` ingests by `part(id)`, each as its batches.
fn dealt_batches(
    path: &Path,
    parts: usize,
    part: impl Fn(&str) -> usize,
) -> Vec<Vec<v1::TraceBatch>> {
    let reader = TraceReader::open(&[path.to_path_buf()], minilm_read_options()).unwrap();
    let mut out = vec![Vec::new(); parts];
    for batch in reader {
        let batch = batch.unwrap();
        for (site, rows) in batch.site_groups() {
            let mut by_part = vec![Vec::new(); parts];
            for r in rows {
                by_part[part(&batch.trace_ids[r])].push(r);
            }
            for (p, rows) in by_part.into_iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                let v = batch.gather(&rows).unwrap();
                let ids = rows.iter().map(|&r| batch.trace_ids[r].clone()).collect();
                out[p].push(encode_trace_batch(
                    &site,
                    ids,
                    Vec::new(),
                    v.dim(),
                    v.as_slice(),
                    Dtype::F32,
                ));
            }
        }
    }
    out
}

async fn fit_request(
    client: &mut Client,
    request: v1::FitRequest,
) -> Result<v1::FitReport, tonic::Status> {
    let mut stream = client.fit(request).await?.into_inner();
    let mut report = None;
    while let Some(msg) = stream.message().await? {
        if let fit_progress::Event::Report(r) = msg.event.unwrap() {
            report = Some(r);
        }
    }
    Ok(report.expect("a report"))
}

fn flagged_share(scores: &[(String, f64, f64)]) -> f64 {
    scores.iter().filter(|s| s.2 <= 0.01).count() as f64 / scores.len() as f64
}

/// Poisoning (issue 10): an ingest of out-of-distribution text among four clean ones is named
/// by the fit's reference check (a leave-out model per ingest), the clean ingests are not, and a
/// fit that leaves the named ingest out (by id, or by commit time) restores the monitor's recall
/// on that kind of text. Unknown ids and empty selections get precise statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_check_names_a_poisoned_ingest_and_a_fit_can_leave_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Limits::default()).await;
    let mut client = server.client().await;
    create(&mut client, "m").await;
    // Trusted prose dealt into four ingests by a hash of the id.
    let clean = dealt_batches(&data(minilm::TRAIN), 4, |id| {
        (actwatch_core::split_unit(99, id) * 4.0) as usize
    });
    let mut ids = Vec::new();
    for batches in clean {
        ids.push(ingest(&mut client, "m", batches).await.unwrap().ingest);
    }
    // The poison: half the code lines (the other half is held out to measure recall), sent as
    // reference data.
    let poison = dealt_batches(&data("dev_ood_code.parquet"), 2, |id| {
        usize::from(actwatch_core::split_unit(7, id) < 0.5)
    });
    let [held_out, poison]: [Vec<v1::TraceBatch>; 2] = poison.try_into().unwrap();
    let poisoned = ingest(&mut client, "m", poison).await.unwrap().ingest;
    let mut all = ids.clone();
    all.push(poisoned);
    let listed: Vec<u64> = info(&mut client, "m")
        .await
        .ingests
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, all);

    let report = fit_request(
        &mut client,
        v1::FitRequest {
            monitor: "m".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.ingests, all);
    let check = report.reference_check.clone().expect("the check ran");
    eprintln!("{check:#?}");
    assert!(check.skipped.is_empty(), "{check:?}");
    assert_eq!(check.ingests.len(), 5);
    for c in &check.ingests {
        assert_eq!(c.first_ingest, c.last_ingest);
        assert_eq!(
            c.suspect,
            c.first_ingest == poisoned,
            "ingest {}: {c:?}",
            c.first_ingest
        );
    }
    let named = check.ingests.iter().find(|c| c.suspect).unwrap();
    assert!(named.flagged_share > 0.5, "{named:?}");
    // GetMonitor serves the same report.
    let served = info(&mut client, "m").await.report.unwrap();
    assert_eq!(served.reference_check, Some(check));

    let score_held_out = |client: &mut Client| {
        let mut client = client.clone();
        let batches = held_out.clone();
        async move {
            let r = client
                .score(v1::ScoreRequest {
                    monitor: "m".into(),
                    batches,
                    complete: true,
                })
                .await
                .unwrap()
                .into_inner();
            let scores: Vec<(String, f64, f64)> = r
                .computations
                .into_iter()
                .map(|c| (c.trace_id, c.score, c.p_value))
                .collect();
            flagged_share(&scores)
        }
    };
    let recall_poisoned = score_held_out(&mut client).await;

    // Left out by id: the fit uses the four clean ingests and flags held-out code again.
    let report = fit_request(
        &mut client,
        v1::FitRequest {
            monitor: "m".into(),
            select: Some(v1::FitSelection {
                exclude_ingests: vec![poisoned],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.ingests, ids);
    let check = report.reference_check.unwrap();
    assert!(check.ingests.iter().all(|c| !c.suspect), "{check:?}");
    let recall_clean = score_held_out(&mut client).await;
    eprintln!("held-out code flagged: {recall_poisoned:.3} poisoned, {recall_clean:.3} clean");
    assert!(
        recall_clean > recall_poisoned + 0.3,
        "{recall_poisoned} -> {recall_clean}"
    );

    // By commit time: everything before the poison.
    let at = info(&mut client, "m")
        .await
        .ingests
        .iter()
        .find(|i| i.id == poisoned)
        .unwrap()
        .committed_unix_ms;
    assert!(at > 0);
    let report = fit_request(
        &mut client,
        v1::FitRequest {
            monitor: "m".into(),
            select: Some(v1::FitSelection {
                committed_to_unix_ms: at,
                ..Default::default()
            }),
            skip_reference_check: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // (Commit times are in ms: an ingest committed in the poison's millisecond would be left
    // out too; these ingests are seconds apart in practice but not by construction.)
    assert!(
        report.ingests.iter().all(|i| ids.contains(i)),
        "{:?}",
        report.ingests
    );
    assert!(report.reference_check.is_none());

    // Precise statuses.
    let fit_status = |select: v1::FitSelection| {
        let mut client = client.clone();
        async move {
            fit_request(
                &mut client,
                v1::FitRequest {
                    monitor: "m".into(),
                    select: Some(select),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err()
        }
    };
    let s = fit_status(v1::FitSelection {
        ingests: vec![9999],
        ..Default::default()
    })
    .await;
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("9999"), "{s:?}");
    let s = fit_status(v1::FitSelection {
        exclude_ingests: all.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let s = fit_status(v1::FitSelection {
        committed_from_unix_ms: 10,
        committed_to_unix_ms: 5,
        ..Default::default()
    })
    .await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
}

/// Creates `name` and fits it on 600 synthetic computations (sites "a" and "b").
async fn fitted_synthetic(client: &mut Client, name: &str) {
    create(client, name).await;
    let reference: Vec<v1::TraceBatch> = synthetic(600, 1)
        .into_iter()
        .map(|(site, ids, d, v)| encode_trace_batch(&site, ids, vec![], d, &v, Dtype::F32))
        .collect();
    ingest(client, name, reference).await.unwrap();
    fit(client, name).await;
}

type Hostile =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;

/// The hostile-input table (issue 10): every hostile request the reliability issue lists, in one
/// place, each with the status it must get and the part of the message that names the limit or
/// the fault; after each, the server is alive (health), another client's open scoring stream
/// answers the same batch with the same p-values, and the monitor it uses is unchanged.
/// docs/hostile-inputs.md lists the same rows with the test that covers each beyond this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_table() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_batch_rows: 1000,
        max_message_bytes: 1 << 20,
        max_sites_per_monitor: 8,
        max_fit_bytes: 64 << 20,
        max_ingests_per_monitor: 100,
        ..Limits::default()
    };
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    fitted_synthetic(&mut client, "good").await;
    let probe_set = synthetic(8, 2);
    let probe = || {
        let (s, ids, d, v) = &probe_set[0];
        encode_trace_batch(s, ids.clone(), vec![], *d, v, Dtype::F32)
    };
    // Another client, its stream open throughout.
    let mut other = server.client().await;
    let mut watch = ScoreStream::open(&mut other, "good").await.unwrap();
    let p = |t: Vec<v1::TraceScore>| -> Vec<Vec<f64>> {
        t.iter()
            .map(|t| t.detectors.iter().map(|d| d.p_value).collect())
            .collect()
    };
    let expected = p(watch.batch(probe()).await.unwrap());
    let before = info(&mut client, "good").await;

    create(&mut client, "target").await;
    create(&mut client, "wide").await;
    ingest(
        &mut client,
        "wide",
        vec![encode_trace_batch(
            "w",
            vec!["c0".into(), "c1".into()],
            vec![],
            4096,
            &vec![0.25; 2 * 4096],
            Dtype::F32,
        )],
    )
    .await
    .unwrap();
    let batch = |site: &str, id: &str, width: usize| {
        encode_trace_batch(
            site,
            vec![id.into()],
            vec![],
            width,
            &vec![0.5; width],
            Dtype::F32,
        )
    };
    let ingest_into = |monitor: &'static str, batches: Vec<v1::TraceBatch>| -> Hostile {
        let mut c = client.clone();
        Box::pin(async move { ingest(&mut c, monitor, batches).await.map(|_| ()) })
    };
    let score = |monitor: &'static str, batch: v1::TraceBatch| -> Hostile {
        let mut c = client.clone();
        Box::pin(async move {
            c.score(v1::ScoreRequest {
                monitor: monitor.into(),
                batches: vec![batch],
                complete: true,
            })
            .await
            .map(|_| ())
        })
    };
    let create_with = |name: &'static str, detectors: &'static str| -> Hostile {
        let mut c = client.clone();
        Box::pin(async move {
            c.create_monitor(v1::CreateMonitorRequest {
                name: name.into(),
                spec: Some(v1::MonitorSpec {
                    detectors: detectors.split(',').map(String::from).collect(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ())
        })
    };
    let fit_of = |monitor: &'static str, select: Option<v1::FitSelection>| -> Hostile {
        let mut c = client.clone();
        Box::pin(async move {
            fit_request(
                &mut c,
                v1::FitRequest {
                    monitor: monitor.into(),
                    select,
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
        })
    };
    let mut nan = vec![0.5f32; 8];
    nan[3] = f32::NAN;
    let mut short = batch("a", "c0", 8);
    short.activations.as_mut().unwrap().data.truncate(20);
    let rows = 1001;
    let too_many_rows = encode_trace_batch(
        "a",
        (0..rows).map(|i| format!("r{i}")).collect(),
        vec![],
        4,
        &vec![0.5; rows * 4],
        Dtype::F32,
    );
    let huge = encode_trace_batch(
        "a",
        (0..900).map(|i| format!("r{i}")).collect(),
        vec![],
        400,
        &vec![0.5; 900 * 400],
        Dtype::F32,
    );

    let table: Vec<(&str, Hostile, Code, &str)> = vec![
        (
            "10 x 100,000 columns",
            ingest_into("target", vec![batch("a", "c0", 100_000)]),
            Code::ResourceExhausted,
            "max_vector_width",
        ),
        (
            "9 sites in one stream",
            ingest_into(
                "target",
                (0..9).map(|i| batch(&format!("s{i}"), "c0", 4)).collect(),
            ),
            Code::ResourceExhausted,
            "max_sites_per_monitor",
        ),
        (
            "a 100,000-byte site name",
            ingest_into("target", vec![batch(&"s".repeat(100_000), "c0", 4)]),
            Code::ResourceExhausted,
            "max_site_name_bytes",
        ),
        (
            "site ../../etc/passwd",
            ingest_into("target", vec![batch("../../etc/passwd", "c0", 4)]),
            Code::InvalidArgument,
            "invalid site name",
        ),
        (
            "a control character in a site",
            ingest_into("target", vec![batch("a\u{7}b", "c0", 4)]),
            Code::InvalidArgument,
            "invalid site name",
        ),
        (
            "a 300-byte trace id",
            ingest_into("target", vec![batch("a", &"i".repeat(300), 4)]),
            Code::ResourceExhausted,
            "max_trace_id_bytes",
        ),
        (
            "a long trace id, scoring",
            score("good", batch("a", &"i".repeat(300), 8)),
            Code::ResourceExhausted,
            "max_trace_id_bytes",
        ),
        (
            "1,001 rows in a batch",
            ingest_into("target", vec![too_many_rows]),
            Code::ResourceExhausted,
            "max_batch_rows",
        ),
        (
            "a 1.4 MB message",
            ingest_into("target", vec![huge]),
            Code::ResourceExhausted,
            "max_message_bytes",
        ),
        (
            "NaN",
            score(
                "good",
                encode_trace_batch("a", vec!["c0".into()], vec![], 8, &nan, Dtype::F32),
            ),
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            "bytes short of the shape",
            score("good", short),
            Code::InvalidArgument,
            "bytes",
        ),
        (
            "the wrong width for a site",
            score("good", batch("a", "c0", 4)),
            Code::InvalidArgument,
            "width 8",
        ),
        (
            "an unknown monitor",
            score("nope", batch("a", "c0", 8)),
            Code::NotFound,
            "nope",
        ),
        (
            "a path as a monitor name",
            create_with("../x", "gaussian"),
            Code::InvalidArgument,
            "invalid monitor name",
        ),
        (
            "knn:k=1000000",
            create_with("k", "knn:k=1000000"),
            Code::InvalidArgument,
            "k",
        ),
        (
            "knn:m=100000",
            create_with("m", "knn:m=100000"),
            Code::InvalidArgument,
            "m",
        ),
        (
            "knn:ef_search=10000000",
            create_with("e", "knn:ef_search=10000000"),
            Code::InvalidArgument,
            "ef_search",
        ),
        (
            "gaussian:rank=999999 (never fits: rank > width)",
            create_with("r", "gaussian:rank=999999"),
            Code::InvalidArgument,
            "rank",
        ),
        (
            "a duplicate detector",
            create_with("d", "gaussian,gaussian"),
            Code::InvalidArgument,
            "listed twice",
        ),
        (
            "a fit over the memory budget",
            fit_of("wide", None),
            Code::ResourceExhausted,
            "max_fit_bytes",
        ),
        (
            "a fit of an unknown ingest",
            fit_of(
                "good",
                Some(v1::FitSelection {
                    ingests: vec![777],
                    ..Default::default()
                }),
            ),
            Code::NotFound,
            "777",
        ),
    ];
    for (what, call, code, needle) in table {
        let Err(s) = call.await else {
            panic!("{what}: accepted")
        };
        assert_eq!(s.code(), code, "{what}: {s:?}");
        assert!(
            s.message().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            s.message()
        );
        assert!(
            s.message().len() <= 1100,
            "{what}: a {}-byte message",
            s.message().len()
        );
        // Alive, and nobody else noticed.
        assert_eq!(
            p(watch.batch(probe()).await.unwrap()),
            expected,
            "after {what}"
        );
        let now = info(&mut other, "good").await;
        assert_eq!(
            (now.fit_version, now.reference_rows),
            (before.fit_version, before.reference_rows),
            "after {what}"
        );
        assert_eq!(
            info(&mut other, "target").await.reference_rows,
            0,
            "after {what}"
        );
    }
    assert_no_temporary_segments(dir.path(), "target");
    drop(watch);
    drop(client);
    drop(other);
    server.stop().await;
}

/// An idle connection does not hold its slot forever (issue 10, "idle connections are never
/// closed"): past `max_connection_age_seconds` the server sends GOAWAY and a connection without
/// streams closes, while a stream open across that age runs on to its end, and the client's next
/// call reconnects transparently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_sent_away_at_its_age_and_open_streams_run_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_connection_age_seconds: 1,
        handshake_timeout_seconds: 60,
        ..Limits::default()
    };
    let server = TestServer::start(dir.path(), limits).await;
    let mut client = server.client().await;
    fitted_synthetic(&mut client, "m").await;
    let probe_set = synthetic(8, 2);
    let probe = || {
        let (s, ids, d, v) = &probe_set[0];
        encode_trace_batch(s, ids.clone(), vec![], *d, v, Dtype::F32)
    };
    let mut stream = ScoreStream::open(&mut client, "m").await.unwrap();
    let first = stream.batch(probe()).await.unwrap();

    // A raw HTTP/2 connection that says hello (so the handshake timeout is not what closes it),
    // answers the server's SETTINGS and PINGs as any live client does (so keepalive is not what
    // closes it either), and sends nothing else.
    let mut raw = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut goaway = false;
        loop {
            let mut head = [0u8; 9];
            if raw.read_exact(&mut head).await.is_err() {
                return goaway;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let mut payload = vec![0u8; len];
            if raw.read_exact(&mut payload).await.is_err() {
                return goaway;
            }
            let reply: Option<Vec<u8>> = match kind {
                // SETTINGS, not an ACK: acknowledge.
                4 if flags & 1 == 0 => Some(vec![0, 0, 0, 4, 1, 0, 0, 0, 0]),
                // PING, not an ACK: answer with the same payload.
                6 if flags & 1 == 0 => {
                    let mut r = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    r.extend_from_slice(&payload);
                    Some(r)
                }
                7 => {
                    goaway = true;
                    None
                }
                _ => None,
            };
            if let Some(r) = reply {
                if raw.write_all(&r).await.is_err() {
                    return goaway;
                }
            }
        }
    })
    .await;
    assert_eq!(
        closed,
        Ok(true),
        "an idle connection was not sent away and closed within 20 s"
    );
    eprintln!("idle connection closed after {:?}", started.elapsed());

    // The stream opened before the age still answers, the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = stream.batch(probe()).await.unwrap();
    assert_eq!(first, again);
    drop(stream);
    // The client's next calls reconnect. (A call racing the close of the old connection can
    // fail once with CANCELLED or UNAVAILABLE in tonic's client; count them.)
    let mut failed = 0;
    for _ in 0..6 {
        match client
            .get_monitor(v1::GetMonitorRequest { name: "m".into() })
            .await
        {
            Ok(_) => {}
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Cancelled | Code::Unavailable),
                    "{s:?}"
                );
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    eprintln!("calls failed by a connection going away: {failed} of 6");
    assert!(failed <= 2, "{failed} of 6 calls failed");
    drop(client);
    server.stop().await;
}
