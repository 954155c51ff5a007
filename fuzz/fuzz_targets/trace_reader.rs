//! A Parquet file read to the end by the trace reader, under the reader options its first byte
//! picks (`actwatch_testkit::fuzz::targets::trace_reader`).
#![no_main]

use std::sync::Once;

use actwatch_testkit::alloc::CappedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// libfuzzer-sys aborts on every panic, even one that is caught. The Parquet decoder (parquet /
/// arrow 60) panics on some corrupt pages and footers, and the trace reader catches those panics
/// and returns them as errors naming the file (`actwatch_io::reader`, `guarded`); so a panic
/// raised inside the parquet or arrow crates is let through to that guard here, and every other
/// panic (actwatch's own, or one the guard does not catch and that leaves the target) still
/// aborts as a crash.
fn let_decoder_panics_reach_the_guard() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let crash = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map_or("", |l| l.file());
            if !(file.contains("/parquet-") || file.contains("/arrow-")) {
                crash(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let_decoder_panics_reach_the_guard();
    actwatch_testkit::fuzz::targets::trace_reader(data);
});
