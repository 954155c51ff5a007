//! Who may call what: bearer tokens with a role, checked on every call before any handler runs
//! ([`AuthorizeLayer`]), and the server's TLS identity ([`Tls`]).
//!
//! A token is never stored: the configuration holds the SHA-256 of each token with its name and
//! role, and a presented token is hashed and compared with every entry in constant time. The gRPC
//! health service answers without a token (load balancers and orchestrators probe it); every
//! other call needs one whenever tokens are configured: none or an unknown one is
//! UNAUTHENTICATED, a `read` token on an admin call is PERMISSION_DENIED. The principal that
//! passed goes into the request's extensions ([`Principal`]), so handlers can say who did what.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::{Error, Result};

/// What a token may do. `Admin` may do everything `Read` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GetMonitor, ListMonitors, Score, StreamScores, WatchFlags, QueryScores, reflection.
    Read,
    /// Also CreateMonitor, DeleteMonitor, IngestReference, Fit.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// One configured token: `[[tokens]]` in `actwatch serve --config`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it (logged with the calls it makes).
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the token (`actwatch token` prints one).
    pub sha256: String,
}

/// The caller of a request that passed [`AuthorizeLayer`]: in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub role: Role,
}

/// The configured tokens, hashed.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Principal)>,
}

impl Tokens {
    /// Checks every entry: a 64-digit hex digest, a unique non-empty name, no digest twice.
    pub fn new(entries: &[TokenEntry]) -> Result<Self> {
        let mut out: Vec<([u8; 32], Principal)> = Vec::with_capacity(entries.len());
        for e in entries {
            if e.name.is_empty() || e.name.len() > 128 || e.name.chars().any(char::is_control) {
                return Err(Error::Config(format!(
                    "token name {:?}: 1 to 128 printable characters",
                    e.name
                )));
            }
            let digest = parse_digest(&e.sha256).ok_or_else(|| {
                Error::Config(format!(
                    "token {:?}: sha256 must be 64 hex digits (actwatch token prints one)",
                    e.name
                ))
            })?;
            if out.iter().any(|(_, p)| *p.name == *e.name) {
                return Err(Error::Config(format!(
                    "token name {:?} given twice",
                    e.name
                )));
            }
            if out.iter().any(|(d, _)| *d == digest) {
                return Err(Error::Config(format!(
                    "token {:?}: the same token as another entry",
                    e.name
                )));
            }
            out.push((
                digest,
                Principal {
                    name: e.name.as_str().into(),
                    role: e.role,
                },
            ));
        }
        Ok(Self { entries: out })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal holding `token`, comparing its digest with every entry in constant time.
    fn find(&self, token: &[u8]) -> Option<&Principal> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (d, p) in &self.entries {
            let diff = d.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(p);
            }
        }
        found
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Lowercase hex SHA-256 of a token: what `[[tokens]]` stores.
pub fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The role a call needs, from its gRPC path; `None`: open to anyone (the health service).
fn required_role(path: &str) -> Option<Role> {
    const ADMIN: [&str; 4] = [
        "/actwatch.v1.ActivationMonitor/CreateMonitor",
        "/actwatch.v1.ActivationMonitor/DeleteMonitor",
        "/actwatch.v1.ActivationMonitor/IngestReference",
        "/actwatch.v1.ActivationMonitor/Fit",
    ];
    if path.starts_with("/grpc.health.v1.Health/") {
        None
    } else if ADMIN.contains(&path) {
        Some(Role::Admin)
    } else {
        // Every other method, known or not (an unknown one then answers UNIMPLEMENTED only to
        // a caller with a token).
        Some(Role::Read)
    }
}

/// The server's TLS identity: `[tls]` in `actwatch serve --config` (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain presented to clients.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl Tls {
    /// Reads the PEM files into tonic's configuration; a handshake that takes longer than
    /// `handshake` is dropped (`Limits::handshake_timeout_seconds`).
    pub fn server_config(&self, handshake: Duration) -> Result<tonic::transport::ServerTlsConfig> {
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                Error::Config(format!("cannot read TLS {what} {}: {e}", path.display()))
            })
        };
        let identity = tonic::transport::Identity::from_pem(
            read("cert", &self.cert)?,
            read("key", &self.key)?,
        );
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .timeout(handshake);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(
                "client_ca",
                ca,
            )?));
        }
        Ok(config)
    }
}

/// How the server is reached: TLS and tokens, each optional. [`Access::default`] is neither, for
/// loopback only (the binary refuses other addresses without both unless told otherwise).
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub tls: Option<Tls>,
    pub tokens: Tokens,
}

/// A tower layer that authorizes every call before it reaches a service ([`Tokens`]); with no
/// tokens configured it lets everything through.
#[derive(Debug, Clone)]
pub(crate) struct AuthorizeLayer {
    tokens: Arc<Tokens>,
    metrics: Arc<Metrics>,
}

impl AuthorizeLayer {
    pub(crate) fn new(tokens: Tokens, metrics: Arc<Metrics>) -> Self {
        Self {
            tokens: Arc::new(tokens),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl AuthorizeLayer {
    /// The principal of a request, or the status that refuses it.
    fn check<B>(
        &self,
        request: &http::Request<B>,
    ) -> std::result::Result<Option<Principal>, tonic::Status> {
        if self.tokens.is_empty() {
            return Ok(None);
        }
        let Some(needed) = required_role(request.uri().path()) else {
            return Ok(None);
        };
        let token = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "a token is required: send the metadata `authorization: Bearer <token>`",
                )
            })?;
        let principal = self
            .tokens
            .find(token)
            .ok_or_else(|| tonic::Status::unauthenticated("unknown token"))?;
        if principal.role < needed {
            return Err(tonic::Status::permission_denied(format!(
                "{} needs the {} role; token {:?} has the {} role",
                request.uri().path().rsplit('/').next().unwrap_or_default(),
                needed.name(),
                &*principal.name,
                principal.role.name()
            )));
        }
        Ok(Some(principal.clone()))
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.layer.check(&request) {
            Ok(principal) => {
                if let Some(p) = principal {
                    request.extensions_mut().insert(p);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                self.layer.metrics.reject(status.code());
                tracing::info!(
                    rpc = request.uri().path(),
                    code = crate::metrics::code_name(status.code()),
                    message = status.message(),
                    "call refused"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, role: Role, token: &str) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            role,
            sha256: token_digest(token),
        }
    }

    #[test]
    fn tokens_find_their_principal_and_nothing_else() {
        let tokens = Tokens::new(&[
            entry("ops", Role::Admin, "t1"),
            entry("dash", Role::Read, "t2"),
        ])
        .unwrap();
        assert_eq!(tokens.find(b"t1").unwrap().role, Role::Admin);
        assert_eq!(&*tokens.find(b"t2").unwrap().name, "dash");
        assert!(tokens.find(b"t3").is_none());
        assert!(tokens.find(b"").is_none());
    }

    #[test]
    fn bad_token_entries_are_refused() {
        let mut bad = entry("a", Role::Read, "t");
        bad.sha256.pop();
        assert!(Tokens::new(&[bad]).is_err());
        let mut upper_z = entry("a", Role::Read, "t");
        upper_z.sha256.replace_range(0..1, "z");
        assert!(Tokens::new(&[upper_z]).is_err());
        assert!(Tokens::new(&[entry("a", Role::Read, "t"), entry("a", Role::Admin, "u")]).is_err());
        assert!(Tokens::new(&[entry("a", Role::Read, "t"), entry("b", Role::Admin, "t")]).is_err());
        assert!(Tokens::new(&[entry("", Role::Read, "t")]).is_err());
    }

    #[test]
    fn roles_follow_the_method() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/actwatch.v1.ActivationMonitor/DeleteMonitor"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/actwatch.v1.ActivationMonitor/Score"),
            Some(Role::Read)
        );
        assert_eq!(
            required_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Role::Read)
        );
        assert!(Role::Admin > Role::Read);
    }
}
