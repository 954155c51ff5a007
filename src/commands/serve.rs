//! `actwatch serve`: the gRPC service until SIGINT or SIGTERM.

use anyhow::{Context, Result};

use crate::cli::ServeArgs;
use crate::config::ServeConfig;

/// Most threads for disk work (tokio's default is 512); work beyond waits for one. Decoding and
/// scoring run on the compute pool (one thread per core), fits on at most `max_concurrent_fits`
/// of these. Each thread reserves a 2 MiB stack, so this bounds the server's address space too.
const BLOCKING_THREADS: usize = 64;

/// Runs the server until SIGINT or SIGTERM, then lets in-flight calls finish.
pub fn run(a: ServeArgs) -> Result<()> {
    let config = ServeConfig::resolve(a)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
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
        actwatch_server::serve(
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
