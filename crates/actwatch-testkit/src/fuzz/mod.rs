//! The fuzz harnesses: for each entry point that decodes outside input, the seeds (small valid
//! inputs made with the project's own writers) and one function that runs an input through the
//! entry point and checks its properties, panicking when one breaks. Two drivers share them: the
//! seeded, bounded suites that run with `cargo test` (`crates/actwatch-proto/tests/fuzz.rs`,
//! `crates/actwatch-io/tests/fuzz.rs`, proptest generating the inputs) and the cargo-fuzz targets
//! (`fuzz/`, libFuzzer generating them). See `docs/fuzzing.md`.
//!
//! - [`proto`]: request bytes as every message that carries a `TraceBatch`, each batch through
//!   `actwatch_proto::decode_trace_batch`;
//! - [`traces`]: Parquet trace files read to the end by `actwatch_io::reader::TraceReader`, and
//!   record batches through `TraceReader::decode_batch`;
//! - [`artifacts`]: monitor directories loaded by `actwatch_io::artifact::load_monitor`, then scored;
//! - [`frames`]: fit states, calibration parts and checkpoints (`actwatch_io::checkpoint`), then
//!   used as a fit in parts uses them;
//! - [`targets`]: the cargo-fuzz targets' bodies and their seed corpus.

pub mod artifacts;
pub mod frames;
pub mod mutate;
pub mod proto;
pub mod targets;
pub mod traces;

/// Environment variable: inputs per fuzz target of the seeded suites (each suite documents its
/// default).
pub const CASES_VAR: &str = "ACTWATCH_FUZZ_CASES";
/// Environment variable: the seed of the seeded suites (proptest's `PROPTEST_RNG_SEED` too).
pub const SEED_VAR: &str = "ACTWATCH_FUZZ_SEED";
/// The seed when neither variable is set.
pub const DEFAULT_SEED: u64 = 0x6163_7477_6174_6368;

/// Inputs per target: [`CASES_VAR`] when set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The seed: [`SEED_VAR`], else `PROPTEST_RNG_SEED`, else [`DEFAULT_SEED`].
pub fn seed() -> u64 {
    [SEED_VAR, "PROPTEST_RNG_SEED"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse().ok()))
        .unwrap_or(DEFAULT_SEED)
}

/// The proptest configuration of a seeded suite: [`cases`]`(default)` inputs, the fixed
/// [`seed`], no failure files (a failure is reproduced by the seed; fixed ones become regression
/// tests).
pub fn proptest_config(default_cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: cases(default_cases),
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed()),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..proptest::test_runner::Config::default()
    }
}

/// Runs `check` on `cases` inputs drawn from `strategy` by a [`proptest_config`] runner (with
/// shrinking on failure), then prints, for the closing notes, how many inputs were executed
/// (shrinking included) and how long it took. Panics with proptest's minimal failing input when
/// a property breaks.
pub fn run<S: proptest::strategy::Strategy>(
    target: &str,
    default_cases: u32,
    strategy: S,
    check: impl Fn(S::Value, &mut Tally),
) -> Tally
where
    S::Value: std::fmt::Debug,
{
    let config = proptest_config(default_cases);
    let (cases, seed) = (config.cases, seed());
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let tally = std::cell::RefCell::new(Tally::default());
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |input| {
        check(input, &mut tally.borrow_mut());
        Ok(())
    });
    let tally = tally.into_inner();
    eprintln!(
        "fuzz[{target}]: {tally} in {:.1} s ({cases} cases, seed {seed})",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz[{target}]: {e}");
    }
    tally
}

/// What a harness saw: inputs run through an entry point, and how many it accepted or refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub inputs: u64,
    pub accepted: u64,
    pub refused: u64,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.inputs += other.inputs;
        self.accepted += other.accepted;
        self.refused += other.refused;
    }

    /// Counts one input and whether it was accepted.
    pub fn record<T, E>(&mut self, result: &Result<T, E>) {
        self.inputs += 1;
        match result {
            Ok(_) => self.accepted += 1,
            Err(_) => self.refused += 1,
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} inputs executed ({} accepted, {} refused)",
            self.inputs, self.accepted, self.refused
        )
    }
}

/// A file's SHA-256 as lowercase hex (the artifact manifest's form).
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
