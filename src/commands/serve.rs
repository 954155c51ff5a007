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
    let access = config.access()?;
    actwatch_server::set_compute_linger(config.compute_linger);
    // Everything the server creates (data directory, segments, artifacts, score logs) is the
    // owner's alone: 0700 directories, 0600 files, whatever the caller's umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    raise_file_limit(config.limits.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Before the port opens: a SIGTERM that arrives while monitors load must shut down
        // gracefully, not kill the process with the signal's default action.
        let shutdown = shutdown_signal();
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        check_exposure(&listener, &access, config.allow_insecure)?;
        let metrics_listener = match &config.metrics_listen {
            None => None,
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            ),
        };
        actwatch_server::serve_with_access(
            listener,
            metrics_listener,
            config.data_dir.clone(),
            config.limits.clone(),
            access,
            shutdown,
        )
        .await
        .with_context(|| format!("serving {}", config.data_dir.display()))?;
        Ok(())
    })
}

/// On loopback anything goes. Beyond it, the API needs TLS and tokens, or `allow_insecure`
/// (then a warning says what is missing).
fn check_exposure(
    listener: &tokio::net::TcpListener,
    access: &actwatch_server::Access,
    allow_insecure: bool,
) -> Result<()> {
    let addr = listener.local_addr().context("the listening address")?;
    if addr.ip().is_loopback() {
        return Ok(());
    }
    let mut missing = Vec::new();
    if access.tls.is_none() {
        missing.push("TLS (--tls-cert, --tls-key)");
    }
    if access.tokens.is_empty() {
        missing.push("tokens ([[tokens]] in --config; see `actwatch token`)");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let missing = missing.join(" and ");
    if !allow_insecure {
        anyhow::bail!(
            "refusing to listen on {addr}, beyond loopback, without {missing}: anyone who can \
             reach it could read, delete or poison every monitor. Configure them, or pass \
             --allow-insecure to do it anyway"
        );
    }
    tracing::warn!(%addr, missing = %missing, "listening beyond loopback without {missing} (--allow-insecure)");
    Ok(())
}

/// Raises the soft limit on open files to the hard one: every connection, segment and log is a
/// descriptor, and `max_connections` must be reachable before the process runs out of them.
/// Warns when it cannot be (the limit bounds connections then, and accepts fail and are logged).
fn raise_file_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    // connections, plus room for the data directory's files and the runtime
    let needed = max_connections as u64 + 256;
    if let Some(files) = getrlimit(Resource::Nofile).current.filter(|&n| n < needed) {
        tracing::warn!(
            open_file_limit = files,
            max_connections,
            "the open-file limit is below max_connections + 256: it bounds connections first"
        );
    }
}

/// Registers the SIGINT (Ctrl-C) and SIGTERM handlers now (inside the runtime) and returns a
/// future that completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::terminate())
            .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
            .ok()
    };
    async move {
        #[cfg(unix)]
        if let Some((mut term, mut int)) = handlers {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
