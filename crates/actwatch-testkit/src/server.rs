//! A real actwatch server on an ephemeral loopback port, owning its shutdown (like arrow-flight's
//! test fixture): [`TestServer::stop`] shuts it down gracefully and waits; dropped, it is signalled
//! to stop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actwatch_proto::v1::activation_monitor_client::ActivationMonitorClient;
use actwatch_server::Limits;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The generated client on a plain channel.
pub type Client = ActivationMonitorClient<Channel>;

/// How long a graceful shutdown may take in a test.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<actwatch_server::Result<()>>>,
}

impl TestServer {
    /// Serves `dir` with `limits` (must be called inside a tokio runtime).
    pub async fn start(dir: &Path, limits: Limits) -> Self {
        Self::start_with_metrics(dir, limits, None).await
    }

    /// [`TestServer::start`], with a Prometheus endpoint on `metrics_listener`.
    pub async fn start_with_metrics(
        dir: &Path,
        limits: Limits,
        metrics_listener: Option<TcpListener>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a local address");
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(actwatch_server::serve(
            listener,
            metrics_listener,
            dir.to_path_buf(),
            limits,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connected client that accepts messages up to 256 MiB each way.
    pub async fn client(&self) -> Client {
        ActivationMonitorClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the test server")
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    /// Shuts the server down gracefully and waits for it; panics if it fails or takes longer
    /// than a minute.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running until stopped");
        tokio::time::timeout(STOP_TIMEOUT, task)
            .await
            .expect("graceful shutdown finishes")
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
