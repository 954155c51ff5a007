//! `actwatch serve`'s settings: defaults, then the `--config` file, then the environment, then
//! the flags.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::ServeArgs;

/// `actwatch serve` defaults, below the config file, the environment and the flags.
pub const DEFAULT_DATA_DIR: &str = "./actwatch-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// The `--metrics-listen` value that disables the metrics endpoint.
pub const METRICS_OFF: &str = "off";

/// The `--config` file. Every key is optional; unknown keys are refused, naming the key (the
/// `[limits]` table deserialises into `actwatch_server::Limits` itself, with its defaults).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    allow_insecure: bool,
    compute_linger_ms: Option<u64>,
    tls: Option<actwatch_server::Tls>,
    #[serde(default)]
    tokens: Vec<actwatch_server::TokenEntry>,
    #[serde(default)]
    limits: actwatch_server::Limits,
}

/// What `actwatch serve` runs with, every layer applied.
#[derive(Debug, PartialEq)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<String>,
    /// TLS identity (`[tls]`, or --tls-cert/--tls-key/--tls-client-ca over it).
    pub tls: Option<actwatch_server::Tls>,
    /// `[[tokens]]` (only in the file: a token's digest is not a flag).
    pub tokens: Vec<actwatch_server::TokenEntry>,
    /// Listen beyond loopback without TLS or tokens.
    pub allow_insecure: bool,
    /// How long the compute pool polls for work after each call (`actwatch_server::set_compute_linger`).
    pub compute_linger: Duration,
    pub limits: actwatch_server::Limits,
}

impl ServeConfig {
    /// Reads the `--config` file (if any) and layers it under `a` (flags, then environment).
    pub fn resolve(a: ServeArgs) -> Result<Self> {
        let file = match &a.config {
            None => ConfigFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
        };
        Self::layer(a, file)
    }

    fn layer(a: ServeArgs, file: ConfigFile) -> Result<Self> {
        let metrics = a
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
        let mut tls = match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(actwatch_server::Tls {
                cert,
                key,
                client_ca: file.tls.and_then(|t| t.client_ca),
            }),
            (None, None) => file.tls,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        if let Some(ca) = a.tls_client_ca {
            match &mut tls {
                Some(t) => t.client_ca = Some(ca),
                None => anyhow::bail!("--tls-client-ca needs a server certificate (--tls-cert)"),
            }
        }
        let linger_ms = a
            .compute_linger_ms
            .or(file.compute_linger_ms)
            .unwrap_or(actwatch_server::DEFAULT_COMPUTE_LINGER.as_millis() as u64);
        let max_ms = actwatch_server::MAX_COMPUTE_LINGER.as_millis();
        anyhow::ensure!(
            u128::from(linger_ms) <= max_ms,
            "compute_linger_ms is {linger_ms}: at most {max_ms} (0 turns the linger off)"
        );
        Ok(Self {
            data_dir: a
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            listen: a
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.into()),
            metrics_listen: (!metrics.eq_ignore_ascii_case(METRICS_OFF)).then_some(metrics),
            tls,
            tokens: file.tokens,
            allow_insecure: a.allow_insecure || file.allow_insecure,
            compute_linger: Duration::from_millis(linger_ms),
            limits: file.limits,
        })
    }

    /// TLS and tokens as the server takes them (token entries checked).
    pub fn access(&self) -> Result<actwatch_server::Access> {
        Ok(actwatch_server::Access {
            tls: self.tls.clone(),
            tokens: actwatch_server::Tokens::new(&self.tokens)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: [&str; 7] = [
        "ACTWATCH_DATA_DIR",
        "ACTWATCH_LISTEN",
        "ACTWATCH_METRICS_LISTEN",
        "ACTWATCH_TLS_CERT",
        "ACTWATCH_TLS_KEY",
        "ACTWATCH_TLS_CLIENT_CA",
        "ACTWATCH_COMPUTE_LINGER_MS",
    ];

    fn serve_args(argv: &[&str]) -> ServeArgs {
        use clap::Parser;
        let argv = ["actwatch", "serve"].iter().chain(argv);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Serve(a) => a,
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
             compute_linger_ms = 3\n[limits]\nmax_batch_rows = 7\nmax_score_log_bytes = 1024\n",
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
                tls: None,
                tokens: Vec::new(),
                allow_insecure: false,
                compute_linger: actwatch_server::DEFAULT_COMPUTE_LINGER,
                limits: actwatch_server::Limits::default(),
            }
        );

        let from_file = ServeConfig::resolve(serve_args(&["--config", file])).unwrap();
        assert_eq!(from_file.data_dir, PathBuf::from("/from/file"));
        assert_eq!(from_file.listen, "127.0.0.1:1");
        assert_eq!(from_file.metrics_listen.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(from_file.compute_linger, Duration::from_millis(3));
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
        std::env::set_var("ACTWATCH_COMPUTE_LINGER_MS", "0");
        let env_over_file = ServeConfig::resolve(serve_args(&["--config", file])).unwrap();
        assert_eq!(env_over_file.compute_linger, Duration::ZERO);
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
            "--compute-linger-ms",
            "2",
        ]))
        .unwrap();
        assert_eq!(flags_over_env.compute_linger, Duration::from_millis(2));
        assert_eq!(flags_over_env.data_dir, PathBuf::from("/from/env"));
        assert_eq!(flags_over_env.listen, "127.0.0.1:4");
        assert_eq!(
            flags_over_env.metrics_listen.as_deref(),
            Some("127.0.0.1:5")
        );

        let flag_off = ServeConfig::resolve(serve_args(&["--metrics-listen", "off"])).unwrap();
        assert_eq!(flag_off.metrics_listen, None);
        let too_long = ServeConfig::resolve(serve_args(&["--compute-linger-ms", "1001"]));
        assert!(
            format!("{:#}", too_long.unwrap_err()).contains("compute_linger_ms is 1001"),
            "a linger beyond the maximum is refused, naming the setting"
        );

        // [tls] and [[tokens]] from the file; TLS flags over the file's, the client CA kept.
        let secure = dir.path().join("secure.toml");
        let digest = actwatch_server::token_digest("t");
        std::fs::write(
            &secure,
            format!(
                "[tls]\ncert = \"/f/cert.pem\"\nkey = \"/f/key.pem\"\nclient_ca = \"/f/ca.pem\"\n\
                 [[tokens]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{digest}\"\n"
            ),
        )
        .unwrap();
        let secure = secure.to_str().unwrap();
        let from_file = ServeConfig::resolve(serve_args(&["--config", secure])).unwrap();
        let tls = from_file.tls.as_ref().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/f/cert.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/f/ca.pem")));
        assert_eq!(from_file.tokens.len(), 1);
        assert_eq!(from_file.tokens[0].role, actwatch_server::Role::Admin);
        assert!(!from_file.access().unwrap().tokens.is_empty());
        let flags = ServeConfig::resolve(serve_args(&[
            "--config",
            secure,
            "--tls-cert",
            "/g/cert.pem",
            "--tls-key",
            "/g/key.pem",
        ]))
        .unwrap();
        let tls = flags.tls.unwrap();
        assert_eq!(
            (tls.cert, tls.key, tls.client_ca),
            (
                PathBuf::from("/g/cert.pem"),
                PathBuf::from("/g/key.pem"),
                Some(PathBuf::from("/f/ca.pem"))
            )
        );
        let ca_alone = ServeConfig::resolve(serve_args(&["--tls-client-ca", "/g/ca.pem"]));
        assert!(ca_alone.is_err());
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
