//! A Parquet file read to the end by the trace reader, under the reader options its first byte
//! picks (`actwatch_testkit::fuzz::targets::trace_reader`).
#![no_main]

use actwatch_testkit::alloc::CappedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fuzz_target!(|data: &[u8]| actwatch_testkit::fuzz::targets::trace_reader(data));
