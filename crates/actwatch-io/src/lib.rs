//! actwatch-io: everything that touches files.
//!
//! Reads activation traces from Parquet in the canonical long format (one row per trace:
//! `trace_id`, `site`, `activation`, plus any other columns carried through untouched), streaming
//! batch by batch and converting vectors to contiguous `f32` once, at the edge; writes Parquet
//! atomically (temporary file, fsync, rename). Every failure names the file it came from.

pub mod artifact;
pub mod checkpoint;
mod error;
pub mod pipeline;
pub mod reader;

pub use error::{Error, Result};
