//! A fit state, calibration part or checkpoint, decoded and used as a fit in parts uses it
//! (`actwatch_testkit::fuzz::targets::fit_frames`).
#![no_main]

use actwatch_testkit::alloc::CappedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fuzz_target!(|data: &[u8]| actwatch_testkit::fuzz::targets::fit_frames(data));
