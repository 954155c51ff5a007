//! actwatch-torch: libtorch inside actwatch, through tch. Optional: everything here needs the
//! crate's `tch` feature (the root package's `torch` feature), so the default build needs no libtorch.
//!
//! - [`capture`]: run a TorchScript model over token ids read from Parquet and write the hidden
//!   states it returns as traces in actwatch's long format (mean-pooled per sequence or per
//!   token), to a Parquet file or straight into a running server's monitor (IngestReference).
//! - [`backend`]: Gaussian and exact kNN raw scores on a libtorch device (CPU or CUDA), plugged
//!   into a [`Monitor`](actwatch_detect::Monitor) as its raw-score kernel, so calibration, fusion
//!   and flags stay the default code's.
//!
//! libtorch is found at build time through `LIBTORCH` (scripts/setup_torch.sh makes a venv with
//! the PyPI torch 2.13.0 wheel that tch 0.26 is built against); the build script puts its
//! directory in the tests' rpath, the root package's in the binary's.
#![cfg(feature = "tch")]

pub mod backend;
pub mod capture;
mod device;
mod error;
pub mod ingest;
mod input;
mod model;
mod sink;

pub use backend::{Families, TorchBackend};
pub use device::parse_device;
pub use error::{Error, Result};
pub use tch::Device;
