use std::path::{Path, PathBuf};

use actwatch_proto::ConversionError;
use tonic::{Code, Status};

/// Everything that can go wrong in the service. [`From<Error> for Status`] is the one place where
/// errors become gRPC statuses: bad input is INVALID_ARGUMENT, never INTERNAL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message failed validation (shape, dtype, byte count, NaN/Inf, missing field).
    #[error(transparent)]
    BadMessage(#[from] ConversionError),
    /// A monitor name that is not `[A-Za-z0-9_.-]{1,64}` (or starts with a dot).
    #[error(
        "invalid monitor name {0:?}: use 1 to 64 of A-Z a-z 0-9 _ . - , not starting with '.'"
    )]
    BadName(String),
    /// A site name with characters outside `[A-Za-z0-9_.:-]` (quoted as an excerpt).
    #[error("invalid site name {0}: use A-Z a-z 0-9 _ . : -")]
    BadSiteName(String),
    /// A monitor spec that does not parse or is out of range.
    #[error("invalid monitor spec: {0}")]
    BadSpec(String),
    /// A batch's width differs from its site's width (fixed by the site's first reference batch).
    #[error("site {site:?} has width {expected}, but the batch has width {got}")]
    WidthMismatch {
        site: String,
        expected: usize,
        got: usize,
    },
    /// A stream that breaks the protocol (no monitor in the first message, another monitor named
    /// later, a message without an event, completing a computation the stream never saw).
    #[error("bad stream: {0}")]
    BadStream(String),
    /// Labels on an ingest that cannot take them (a monitor without probes, a count that is
    /// neither 1 nor the batch's rows, one computation labelled both ways).
    #[error("invalid labels: {0}")]
    BadLabels(String),
    /// No monitor of this name.
    #[error("no monitor named {0:?}")]
    MonitorNotFound(String),
    /// A monitor whose files could not be loaded at start: not served; DeleteMonitor removes it.
    #[error("monitor {name:?} is damaged and not served ({reason}); DeleteMonitor removes it")]
    MonitorDamaged { name: String, reason: String },
    /// A monitor of this name exists already.
    #[error("monitor {0:?} already exists")]
    MonitorExists(String),
    /// The monitor cannot score yet.
    #[error("monitor {0:?} is not fitted: ingest reference data and call Fit first")]
    NotFitted(String),
    /// Fit was asked of a monitor without reference data.
    #[error("monitor {0:?} has no reference data: call IngestReference first")]
    NoReferenceData(String),
    /// A FitSelection names an ingest the monitor does not hold.
    #[error("monitor {monitor:?} has no ingest {ingest} (GetMonitor lists its ingests)")]
    IngestNotFound { monitor: String, ingest: u64 },
    /// A FitSelection that cannot be applied (a time bound over ingests whose commit time is not
    /// recorded; nothing left to fit).
    #[error("fit selection: {0}")]
    BadSelection(String),
    /// Another Fit of the same monitor is running.
    #[error("a fit of monitor {0:?} is already running")]
    FitInProgress(String),
    /// A configured limit was hit; `limit` is the field of [`crate::Limits`] that says how much.
    #[error("limit {limit} ({max}) exceeded: {detail}")]
    LimitExceeded {
        limit: &'static str,
        max: u64,
        detail: String,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Fitting or scoring failed inside the offline core.
    #[error(transparent)]
    Detect(#[from] actwatch_detect::Error),
    /// Reading or writing Parquet segments or monitor artifacts failed.
    #[error(transparent)]
    Pipeline(#[from] actwatch_io::Error),
    /// A file or directory of the data directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A stored file (spec, state) is corrupt.
    #[error("{}: corrupt: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    /// Reference segments failed verification before a fit (their bytes no longer match the
    /// checksum recorded when they were committed) and were quarantined: moved into the
    /// monitor's `quarantine/` folder (`folder`) and dropped from `state.json`. Nothing was
    /// fitted; the data is lost to the monitor, and a new Fit uses what remains.
    #[error(
        "monitor {monitor:?}: reference segment{} {} failed verification ({}) and {} quarantined \
         (moved to {}, no longer listed in state.json); nothing was fitted, and a new Fit uses the \
         remaining data",
        if segments.len() == 1 { "" } else { "s" },
        segments.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>().join(", "),
        segments.iter().map(|(_, why)| why.as_str()).collect::<Vec<_>>().join("; "),
        if segments.len() == 1 { "was" } else { "were" },
        folder.display()
    )]
    SegmentsQuarantined {
        monitor: String,
        /// (file name, why it failed)
        segments: Vec<(String, String)>,
        folder: PathBuf,
    },
    /// A blocking task panicked or was cancelled (a bug, never input).
    #[error("internal task failed: {0}")]
    Task(String),
    /// The transport failed to start or serve.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The server's access configuration (TLS files, tokens) is unusable; it does not start.
    #[error("access configuration: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn storage(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Storage {
            path: path.into(),
            source,
        }
    }

    /// The full disk (ENOSPC, or EDQUOT: a quota) behind this error, however it is wrapped (the
    /// Parquet writer wraps the io error of a write it could not make in its own External
    /// error), and the file being written where the error names one.
    fn full_disk(&self) -> Option<(Option<&Path>, &std::io::Error)> {
        let path = match self {
            Error::Storage { path, .. } => Some(path.as_path()),
            Error::Pipeline(e) => e.path(),
            _ => None,
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if is_full_disk(io) {
                    return Some((path, io));
                }
            }
            next = e.source();
        }
        None
    }

    /// Maps a status that tonic raised while decoding a request: an over-long message becomes the
    /// `max_message_bytes` limit; anything else (client cancelled, broken stream) is passed on.
    /// tonic's decoder raises OUT_OF_RANGE for an over-long message and for nothing else, and no
    /// handler of this service answers OUT_OF_RANGE ([`From<Error> for Status`] never does), so
    /// the code alone identifies it (its message text is tonic's to change).
    pub(crate) fn from_inbound(status: Status, max_message_bytes: usize) -> Status {
        if status.code() == Code::OutOfRange {
            return Error::LimitExceeded {
                limit: "max_message_bytes",
                max: max_message_bytes as u64,
                detail: status.message().to_string(),
            }
            .into();
        }
        // tonic answers bytes that are not the request's protobuf message with INTERNAL, which
        // blames the server for the client's input.
        if status.code() == Code::Internal
            && status
                .message()
                .starts_with("failed to decode Protobuf message")
        {
            return Status::invalid_argument(format!("malformed request: {}", status.message()));
        }
        status
    }
}

/// ENOSPC (28) or EDQUOT (122, Linux's number), by code or by kind.
fn is_full_disk(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122))
        || matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
}

fn io_code(e: &std::io::Error) -> Code {
    if is_full_disk(e) {
        // Nothing was acknowledged; the same call succeeds once space is freed.
        return Code::ResourceExhausted;
    }
    Code::Internal
}

fn core_code(e: &actwatch_core::Error) -> Code {
    match e {
        actwatch_core::Error::WidthMismatch { .. }
        | actwatch_core::Error::NonFinite { .. }
        | actwatch_core::Error::Malformed(_)
        | actwatch_core::Error::Provenance(_)
        | actwatch_core::Error::Empty(_) => Code::InvalidArgument,
    }
}

fn detect_code(e: &actwatch_detect::Error) -> Code {
    match e {
        actwatch_detect::Error::Input(e) => core_code(e),
        actwatch_detect::Error::InvalidOption(_) => Code::InvalidArgument,
        // The reference data cannot support the fit that was asked: more data is the remedy.
        actwatch_detect::Error::NotEnoughData(_) => Code::FailedPrecondition,
        actwatch_detect::Error::UnknownSite { .. }
        | actwatch_detect::Error::SiteWidth { .. }
        | actwatch_detect::Error::NotOpen(_) => Code::InvalidArgument,
        actwatch_detect::Error::TooManyOpen { .. }
        | actwatch_detect::Error::JointPending { .. } => Code::ResourceExhausted,
        // The traces are well-formed; the monitor (its reference) is not for them.
        actwatch_detect::Error::Provenance { .. } => Code::FailedPrecondition,
        actwatch_detect::Error::Numerical(_) => Code::Internal,
    }
}

fn pipeline_code(e: &actwatch_io::Error) -> Code {
    use actwatch_io::Error as E;
    match e {
        E::Io { source, .. } => io_code(source),
        // Segments and artifacts are the server's own files: failing to read them is ours.
        E::Parquet { .. }
        | E::Ipc { .. }
        | E::Arrow(_)
        | E::MissingColumn { .. }
        | E::BadColumnType { .. }
        | E::WidthMismatch { .. }
        | E::EmptyVector { .. }
        | E::NonFinite { .. }
        | E::NullValue { .. }
        | E::BadValue { .. }
        | E::Metadata { .. }
        | E::Write { .. }
        | E::Json(_)
        | E::Bincode(_) => Code::Internal,
        E::Artifact(_) => Code::DataLoss,
        E::NoInput(_) => Code::FailedPrecondition,
        E::Detect(e) | E::Examples { source: e, .. } => detect_code(e),
        E::Core(e) => core_code(e),
    }
}

/// Longest status message a client gets (and the log records): a longer one can only come from
/// echoing the client's own input back (a huge detector spec, say), and is cut.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// `status` with its message cut to [`MAX_STATUS_MESSAGE_BYTES`] (at a character boundary,
/// saying how much was cut).
pub(crate) fn capped(status: Status) -> Status {
    let m = status.message();
    if m.len() <= MAX_STATUS_MESSAGE_BYTES {
        return status;
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    Status::new(
        status.code(),
        format!("{}... ({} more bytes cut)", &m[..end], m.len() - end),
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        // A full disk is the disk's, whichever write met it and however that write wraps it
        // (the Parquet writer's error would otherwise say "invalid or unreadable Parquet").
        if let Some((path, io)) = e.full_disk() {
            let place = path.map_or_else(
                || "the data directory".to_string(),
                |p| p.display().to_string(),
            );
            return Status::new(
                Code::ResourceExhausted,
                format!(
                    "the disk is full: writing {place} failed ({io}); the call was not \
                     applied: free space and retry"
                ),
            );
        }
        let code = match &e {
            Error::BadMessage(_)
            | Error::BadName(_)
            | Error::BadSiteName(_)
            | Error::BadSpec(_)
            | Error::WidthMismatch { .. }
            | Error::BadStream(_)
            | Error::BadLabels(_) => Code::InvalidArgument,
            Error::MonitorNotFound(_) | Error::IngestNotFound { .. } => Code::NotFound,
            Error::MonitorExists(_) => Code::AlreadyExists,
            Error::NotFitted(_) | Error::NoReferenceData(_) | Error::BadSelection(_) => {
                Code::FailedPrecondition
            }
            Error::FitInProgress(_) => Code::Aborted,
            Error::LimitExceeded { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Detect(d) => detect_code(d),
            Error::Pipeline(p) => pipeline_code(p),
            Error::Storage { source, .. } => io_code(source),
            Error::Corrupt { .. }
            | Error::MonitorDamaged { .. }
            | Error::SegmentsQuarantined { .. } => Code::DataLoss,
            Error::Task(_) | Error::Transport(_) | Error::Reflection(_) | Error::Config(_) => {
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_invalid_argument_never_internal() {
        let cases: Vec<(Error, Code)> = vec![
            (
                ConversionError::Missing("site").into(),
                Code::InvalidArgument,
            ),
            (
                Error::WidthMismatch {
                    site: "6".into(),
                    expected: 384,
                    got: 383,
                },
                Code::InvalidArgument,
            ),
            (
                actwatch_detect::Error::Input(actwatch_core::Error::Empty("x".into())).into(),
                Code::InvalidArgument,
            ),
            (Error::MonitorNotFound("m".into()), Code::NotFound),
            (Error::NotFitted("m".into()), Code::FailedPrecondition),
            (Error::MonitorExists("m".into()), Code::AlreadyExists),
            (
                Error::LimitExceeded {
                    limit: "max_batch_rows",
                    max: 10,
                    detail: "11 rows".into(),
                },
                Code::ResourceExhausted,
            ),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{s:?}");
        }
    }

    #[test]
    fn over_long_messages_name_the_limit() {
        let s = Error::from_inbound(
            Status::out_of_range(
                "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
            ),
            8,
        );
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("max_message_bytes"), "{}", s.message());
        let s = Error::from_inbound(Status::cancelled("gone"), 8);
        assert_eq!(s.code(), Code::Cancelled);
    }

    /// ENOSPC and EDQUOT are RESOURCE_EXHAUSTED saying the disk is full and where, however
    /// they are wrapped: a plain io error, or the Parquet writer's External error around it
    /// (which used to read "invalid or unreadable Parquet" and answer INTERNAL). Other io
    /// errors keep their codes.
    #[test]
    fn a_full_disk_is_resource_exhausted_however_it_is_wrapped() {
        use std::io;

        use parquet::errors::ParquetError;

        let full = || io::Error::from_raw_os_error(28);
        let parquet = |source: io::Error| {
            Error::Pipeline(actwatch_io::Error::Parquet {
                path: "/data/monitors/m/reference/seg-00000001-d8.parquet".into(),
                source: ParquetError::External(Box::new(source)),
            })
        };
        let full_cases: Vec<(Error, &str)> = vec![
            (
                Error::storage("/data/monitors/m/state.json", full()),
                "state.json",
            ),
            (parquet(full()), "seg-00000001-d8.parquet"),
            (
                parquet(io::Error::from_raw_os_error(122)),
                "seg-00000001-d8.parquet",
            ),
            (
                Error::Pipeline(actwatch_io::Error::Io {
                    path: "/data/monitors/m/fitter.bin".into(),
                    source: io::Error::new(io::ErrorKind::StorageFull, "no room"),
                }),
                "fitter.bin",
            ),
            (
                Error::storage(
                    "/data/monitors/m/scores/log-00000001.jsonl",
                    io::Error::from_raw_os_error(122),
                ),
                "log-00000001.jsonl",
            ),
        ];
        for (e, path) in full_cases {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("disk is full"), "{s:?}");
            assert!(s.message().contains(path), "{s:?}");
            assert!(!s.message().contains("invalid or unreadable"), "{s:?}");
        }
        let eio = || io::Error::from_raw_os_error(5);
        for e in [parquet(eio()), Error::storage("/data/x", eio())] {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::Internal, "{s:?}");
        }
    }
}
