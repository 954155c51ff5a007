//! actwatch-io: everything that touches files.
//!
//! Reads activation traces from Parquet in the canonical long format (one row per trace:
//! `trace_id`, `site`, `activation`, plus any other columns carried through untouched), streaming
//! batch by batch and converting vectors to contiguous `f32` once, at the edge; writes traces in
//! the same format ([`writer::TraceWriter`]) and every other file format of actwatch (monitor
//! artifacts, fit checkpoints). The decision a reader must know: every file written for keeps goes
//! through one durable-write primitive ([`durable`]: temporary file, fsync, rename, fsync of the
//! directory, failures never ignored). Every failure names the file it came from.

pub mod artifact;
pub mod checkpoint;
pub mod checksum;
pub mod durable;
mod error;
pub mod pipeline;
pub mod provenance;
pub mod reader;
pub mod writer;

pub use error::{Error, Result};
