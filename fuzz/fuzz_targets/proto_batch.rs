//! Structurally valid `TraceBatch` messages with arbitrary fields (shape, dtype, data, ids,
//! positions, provenance), decoded against their contract
//! (`actwatch_testkit::fuzz::proto::check_batch`).
#![no_main]

use actwatch_proto::v1;
use actwatch_testkit::alloc::CappedAlloc;
use actwatch_testkit::fuzz::proto::check_batch;
use actwatch_testkit::fuzz::Tally;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[derive(Arbitrary, Debug)]
struct Batch {
    site: String,
    data: Vec<u8>,
    shape: Vec<u64>,
    dtype: i32,
    trace_ids: Vec<String>,
    positions: Vec<i32>,
    provenance: Option<[String; 5]>,
}

fuzz_target!(|b: Batch| {
    let batch = v1::TraceBatch {
        site: b.site,
        activations: Some(v1::Tensor {
            data: b.data.into(),
            shape: b.shape,
            dtype: b.dtype,
        }),
        trace_ids: b.trace_ids,
        positions: b.positions,
        provenance: b.provenance.map(
            |[model, revision, capture, pooling, dtype]| v1::Provenance {
                model,
                revision,
                capture,
                pooling,
                dtype,
            },
        ),
    };
    let _ = check_batch(batch, &mut Tally::default());
});
