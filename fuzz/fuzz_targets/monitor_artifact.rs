//! A seed monitor directory with one file replaced, loaded and scored
//! (`actwatch_testkit::fuzz::targets::monitor_artifact`).
#![no_main]

use actwatch_testkit::alloc::CappedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fuzz_target!(|data: &[u8]| actwatch_testkit::fuzz::targets::monitor_artifact(data));
