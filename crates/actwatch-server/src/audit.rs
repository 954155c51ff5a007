//! The audit log: who changed which monitor, when, and with what. One JSON line per admin call
//! that reached a handler (CreateMonitor, DeleteMonitor, IngestReference, Fit), whether it
//! succeeded or not, appended to `<data dir>/audit.jsonl` and fsynced before the call answers.
//! Append-only: the server never rewrites or truncates it, except to cut off a failed append of
//! its own, so that no half line is ever read back. Calls refused before any handler (no token,
//! wrong role) are counted and logged by [`crate::access`], not here: they changed nothing.
//!
//! An ingest's entry carries the SHA-256 over the SHA-256 of each batch's activation bytes, in
//! order, so the data a fit learned from can be traced to the ingest (and principal) that sent it.
//!
//! The audit record follows the change (a crash between the two loses the record, never the
//! change); a failed append is logged at ERROR, and the call still answers what it did.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tonic::Request;

use crate::access::Principal;
use crate::{Error, Result};

/// The file, in the data directory's root.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// Who made a call: the token's principal (when tokens are configured) and the peer address.
#[derive(Debug, Clone, Default)]
pub(crate) struct Actor {
    principal: Option<Principal>,
    peer: Option<String>,
}

impl Actor {
    pub(crate) fn of<T>(request: &Request<T>) -> Self {
        Self {
            principal: request.extensions().get::<Principal>().cloned(),
            peer: request.remote_addr().map(|a| a.to_string()),
        }
    }

    /// The token's principal, when tokens are configured.
    pub(crate) fn principal_name(&self) -> Option<String> {
        self.principal.as_ref().map(|p| p.name.to_string())
    }
}

/// What an entry says beyond who, when, what and on which monitor.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// SHA-256 over each batch's SHA-256 (ingest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental: Option<bool>,
    /// The status message of a failed call (already capped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Entry<'a> {
    at_unix_ms: i64,
    principal: Option<&'a str>,
    role: Option<&'static str>,
    peer: Option<&'a str>,
    action: &'static str,
    monitor: &'a str,
    /// "OK" or the gRPC code's name.
    outcome: &'static str,
    #[serde(flatten)]
    details: &'a Details,
}

/// The open log and its length (what a failed append is cut back to).
#[derive(Debug)]
pub(crate) struct AuditLog {
    path: PathBuf,
    file: Mutex<(File, u64)>,
}

impl AuditLog {
    /// Opens (creating) `<root>/audit.jsonl`. A torn last line (a crash mid-append) is cut off,
    /// so the next entry starts on a line of its own.
    pub(crate) fn open(root: &Path) -> Result<Self> {
        let path = root.join(AUDIT_FILE);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::storage(&path, e))?;
        let bytes = std::fs::read(&path).map_err(|e| Error::storage(&path, e))?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64;
        if whole < bytes.len() as u64 {
            tracing::warn!(
                file = %path.display(),
                cut = bytes.len() as u64 - whole,
                "the audit log ends in a torn line (a crash mid-append); cutting it off"
            );
            file.set_len(whole)
                .and_then(|()| file.sync_data())
                .map_err(|e| Error::storage(&path, e))?;
        }
        actwatch_io::durable::sync_dir(root)?;
        Ok(Self {
            path,
            file: Mutex::new((file, whole)),
        })
    }

    /// Appends one entry (blocking: an fsync). Failures are logged, not returned: the change it
    /// records has happened.
    pub(crate) fn record(
        &self,
        actor: &Actor,
        action: &'static str,
        monitor: &str,
        outcome: tonic::Code,
        details: &Details,
    ) {
        let entry = Entry {
            at_unix_ms: crate::storage::now_unix_ms(),
            principal: actor.principal.as_ref().map(|p| &*p.name),
            role: actor.principal.as_ref().map(|p| p.role.name()),
            peer: actor.peer.as_deref(),
            action,
            monitor,
            outcome: crate::metrics::code_name(outcome),
            details,
        };
        let mut line = match serde_json::to_vec(&entry) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit entry");
                return;
            }
        };
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let (file, len) = &mut *guard;
        let written = file.write_all(&line).and_then(|()| file.sync_data());
        match written {
            Ok(()) => *len += line.len() as u64,
            Err(e) => {
                // Opened to append: the next entry lands at the cut.
                let cut = file.set_len(*len).and_then(|()| file.sync_data());
                tracing::error!(
                    file = %self.path.display(),
                    error = %e,
                    cut_back = cut.is_ok(),
                    action,
                    monitor,
                    "cannot append to the audit log"
                );
            }
        }
    }
}
