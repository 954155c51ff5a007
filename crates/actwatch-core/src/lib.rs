//! actwatch-core: the words every other crate shares.
//!
//! A *trace* is one activation vector read at one *site* of a model, tagged with the id of the
//! *computation* (forward pass, request) it belongs to. Vectors travel as [`Vectors`]: one
//! contiguous row-major `f32` block per batch, converted once at the edge from whatever dtype the
//! producer used (f32, f16, bf16). Everything downstream (statistics, GEMMs, indexes) reads that block
//! without copying it again; the traces of one site travel as a [`SiteBatch`] (ids, optional token
//! positions, vectors), checked once when it is built. This crate knows nothing of Arrow, files or transport.

mod batch;
mod dtype;
mod error;
mod provenance;
mod split;
mod vectors;

pub use batch::SiteBatch;
pub use dtype::{decode_le, Dtype};
pub use error::{Error, Result};
pub use provenance::{Provenance, ProvenanceConflict, MAX_PROVENANCE_VALUE_BYTES};
pub use split::{split_unit, SplitHasher};
pub use vectors::{check_rows, l2_normalize_rows, Vectors};
