//! Request bytes as every message that carries a `TraceBatch`, each batch through
//! `actwatch_proto::decode_trace_batch` (`actwatch_testkit::fuzz::targets::proto_requests`).
#![no_main]

use actwatch_testkit::alloc::CappedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fuzz_target!(|data: &[u8]| actwatch_testkit::fuzz::targets::proto_requests(data));
