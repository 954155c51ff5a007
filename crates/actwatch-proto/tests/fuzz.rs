//! Seeded fuzzing of request decoding (`decode_trace_batch` and the requests that carry
//! batches), bounded so that it runs with every `cargo test`; the harness is shared with the
//! cargo-fuzz targets (`actwatch_testkit::fuzz::proto`, `fuzz/`; see `docs/fuzzing.md`).
//!
//! - `ACTWATCH_FUZZ_CASES=N`: N inputs per target instead of each target's default below
//!   (e.g. 200000 for a long run: `ACTWATCH_FUZZ_CASES=200000 cargo test --release -p
//!   actwatch-proto --test fuzz -- --nocapture`);
//! - `ACTWATCH_FUZZ_SEED=S` (or `PROPTEST_RNG_SEED=S`): another seed (default fixed, so every run
//!   executes the same inputs).
//!
//! Each target prints how many inputs it executed (`--nocapture` shows it). Properties: no panic;
//! no single allocation beyond a linear budget of the input's size (the installed allocator
//! measures it); a batch accepted exactly when its contract allows, with the values its bytes
//! hold; a valid batch round-trips through the wire.

use actwatch_core::Dtype;
use actwatch_proto::{decode_trace_batch, v1};
use actwatch_testkit::alloc::CappedAlloc;
use actwatch_testkit::fuzz::mutate::{mutated, strategy::mutations};
use actwatch_testkit::fuzz::proto::{check_batch, decode_requests, round_trip, seed_requests};
use actwatch_testkit::fuzz::{run, Tally};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Arbitrary bytes, and valid requests of every kind mutated byte by byte, decoded as every
/// request that carries a batch.
#[test]
fn request_bytes() {
    let seeds = seed_requests();
    let n = seeds.len();
    let input = prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..256),
        3 => (0..n, 0..n, mutations(64, 6)).prop_map(move |(i, d, m)| {
            mutated(&seeds[i].1, &m, &seeds[d].1)
        }),
    ];
    run("proto::request_bytes", 20_000, input, |bytes, tally| {
        let mut batches = Tally::default();
        decode_requests(&bytes, &mut batches);
        tally.inputs += 1;
        tally.accepted += batches.accepted;
        tally.refused += batches.refused;
    });
}

/// The knobs of one hostile batch (see [`build`]).
#[derive(Debug, Clone)]
struct Knobs {
    site: u8,
    dtype: i32,
    rows: u64,
    cols: u64,
    shape: u8,
    ids: u8,
    data: u8,
    payload: Vec<u8>,
    special: (usize, u8),
    positions: u8,
    provenance: u8,
}

/// Declared dimensions: mostly small (1 to 5), or zero, or at the edges (overflowing `rows * cols * size` or `usize`).
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        12 => 1u64..6,
        1 => proptest::sample::select(vec![
            1 << 31,
            1 << 32,
            (1 << 32) + 1,
            1 << 62,
            (1 << 63) + 1,
            u64::MAX,
            u64::MAX / 2,
            u64::MAX / 4 + 1,
            1_000_000,
        ]),
    ]
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        (
            0u8..8,
            prop_oneof![12 => 1i32..4, 1 => -2i32..6, 1 => any::<i32>()],
            dim(),
            dim(),
            0u8..10,
            0u8..10,
        ),
        (
            0u8..10,
            proptest::collection::vec(any::<u8>(), 0..96),
            (any::<usize>(), 0u8..16),
            0u8..8,
            0u8..8,
        ),
    )
        .prop_map(
            |(
                (site, dtype, rows, cols, shape, ids),
                (data, payload, special, positions, provenance),
            )| Knobs {
                site,
                dtype,
                rows,
                cols,
                shape,
                ids,
                data,
                payload,
                special,
                positions,
                provenance,
            },
        )
}

/// Bytes of a special value of each dtype at `kind`: NaN, +inf, -inf, the largest finite, a
/// subnormal, -0.
fn special_bytes(dtype: i32, kind: u8) -> Vec<u8> {
    match dtype {
        1 => [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-45,
            -0.0,
            f32::from_bits(0x7fc0_0001),
            f32::MIN_POSITIVE,
        ][usize::from(kind % 8)]
        .to_le_bytes()
        .to_vec(),
        2 => [
            0x7e00u16, 0x7c00, 0xfc00, 0x7bff, 0x0001, 0x8000, 0x7c01, 0xffff,
        ][usize::from(kind % 8)]
        .to_le_bytes()
        .to_vec(),
        _ => [
            0x7fc0u16, 0x7f80, 0xff80, 0x7f7f, 0x0001, 0x8000, 0x7f81, 0xffff,
        ][usize::from(kind % 8)]
        .to_le_bytes()
        .to_vec(),
    }
}

/// A `TraceBatch` from its knobs: every field valid, or broken in one of the ways a client can
/// break it (empty or 70 kB site; unknown dtype; shape of the wrong rank, dimensions that
/// overflow; ids short, long or empty; data of the wrong length; NaN, infinities and subnormals
/// in every dtype; positions of the wrong length; provenance too long or with control
/// characters).
fn build(k: &Knobs) -> v1::TraceBatch {
    let site = match k.site {
        0 => String::new(),
        1 => "x".repeat(70_000),
        2 => "layer\u{0}\u{1f600}".into(),
        _ => "blocks.6.hook_resid_post".into(),
    };
    let (rows, cols) = (k.rows, k.cols);
    let shape = match k.shape {
        0 => vec![rows],
        1 => vec![rows, cols, 1],
        2 => Vec::new(),
        _ => vec![rows, cols],
    };
    // A small number of ids near `rows` (never allocating `rows` of them when it is huge).
    let r = usize::try_from(rows.min(64)).unwrap_or(64);
    let n_ids = match k.ids {
        0 => r.saturating_sub(1),
        1 => r + 1,
        _ => r,
    };
    let trace_ids: Vec<String> = (0..n_ids)
        .map(|i| {
            if k.ids == 2 && i + 1 == n_ids {
                String::new()
            } else {
                format!("c{}", i / 2)
            }
        })
        .collect();
    let size: u64 = match k.dtype {
        1 => 4,
        2 | 3 => 2,
        _ => 4,
    };
    let exact = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(size))
        .filter(|&n| n <= 1 << 16);
    let len = match (k.data, exact) {
        (0, _) | (_, None) => k.payload.len(),
        (1, Some(n)) => n as usize + 1,
        (2, Some(n)) => (n as usize).saturating_sub(1),
        (_, Some(n)) => n as usize,
    };
    let mut data: Vec<u8> = (0..len)
        .map(|i| {
            if k.payload.is_empty() {
                // finite f32 / f16 / bf16 patterns: small exponents
                [0x00, 0x3c, 0x12, 0x40][i % 4]
            } else {
                // keep most values finite: clear the top exponent bit of each element's last byte
                let b = k.payload[i % k.payload.len()];
                if (i + 1) % size as usize == 0 {
                    b & 0x3f
                } else {
                    b
                }
            }
        })
        .collect();
    if k.special.1 < 6 && !data.is_empty() {
        let s = special_bytes(k.dtype, k.special.1);
        let at = (k.special.0 % data.len()) / s.len() * s.len();
        let end = (at + s.len()).min(data.len());
        data[at..end].copy_from_slice(&s[..end - at]);
    }
    let positions = match k.positions {
        0 | 1 => Vec::new(),
        2 => (0..n_ids as i32 + 1).collect(),
        _ => (0..n_ids as i32).map(|p| p - 1).collect(),
    };
    let provenance = match k.provenance {
        0 => None,
        1 => Some(v1::Provenance {
            model: "m".repeat(300),
            ..Default::default()
        }),
        2 => Some(v1::Provenance {
            capture: "hooks\noutput".into(),
            ..Default::default()
        }),
        _ => Some(v1::Provenance {
            model: "sentence-transformers/all-MiniLM-L6-v2".into(),
            dtype: "float16".into(),
            ..Default::default()
        }),
    };
    v1::TraceBatch {
        site,
        activations: Some(v1::Tensor {
            data: data.into(),
            shape,
            dtype: k.dtype,
        }),
        trace_ids,
        positions,
        provenance,
    }
}

/// Structurally valid batches with hostile fields, decoded against the contract.
#[test]
fn hostile_batches() {
    run("proto::hostile_batches", 20_000, knobs(), |k, tally| {
        let _ = check_batch(build(&k), tally);
    });
}

/// A value that `dtype` may or may not hold: ordinary, at the edges of f16 (65504 is its
/// largest, 70000 overflows it), subnormal, or overflowing bf16 too.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -1000.0f32..1000.0,
        1 => proptest::sample::select(vec![
            0.0, -0.0, 65504.0, 70000.0, -1e6, 1e-8, 6e-5, f32::MAX, f32::MIN_POSITIVE, 3.0e38,
        ]),
    ]
}

/// Valid batches through the wire and back, in every dtype.
#[test]
fn valid_batches_round_trip() {
    let input = (1usize..8, 1usize..8, 0u8..3, any::<bool>()).prop_flat_map(
        |(rows, dim, dtype, positions)| {
            (
                proptest::collection::vec(value(), rows * dim),
                proptest::collection::vec("[a-zA-Z0-9_.:-]{1,12}", rows),
                Just((dim, dtype, positions)),
            )
        },
    );
    run(
        "proto::valid_batches_round_trip",
        5000,
        input,
        |(values, ids, (dim, dtype, with_positions)), tally| {
            let dtype = [Dtype::F32, Dtype::F16, Dtype::Bf16][usize::from(dtype)];
            let positions = if with_positions {
                (0..ids.len() as i32).collect()
            } else {
                Vec::new()
            };
            round_trip("layer.4", ids, positions, dim, &values, dtype, tally);
        },
    );
}

/// Declared sizes that overflow or far exceed the data are refused before anything is
/// allocated for them.
#[test]
fn huge_declared_shapes_are_refused_without_allocating() {
    for (rows, cols) in [
        (u64::MAX, u64::MAX),
        (1 << 62, 4),
        (1, u64::MAX),
        (1 << 32, 1 << 32),
        (1, 1 << 40),
    ] {
        let batch = v1::TraceBatch {
            site: "s".into(),
            activations: Some(v1::Tensor {
                data: vec![0u8; 16].into(),
                shape: vec![rows, cols],
                dtype: v1::DType::DtypeF16 as i32,
            }),
            trace_ids: vec!["a".into()],
            positions: Vec::new(),
            provenance: None,
        };
        let mut tally = Tally::default();
        assert!(check_batch(batch, &mut tally).is_err());
        assert_eq!(tally.refused, 1);
    }
}

/// Regression: a shape of many dimensions was quoted whole in the error message, so a client
/// could make the server format and send back an error many times the size of its request.
#[test]
fn errors_quote_a_long_shape_as_an_excerpt() {
    let batch = v1::TraceBatch {
        site: "s".into(),
        activations: Some(v1::Tensor {
            data: Vec::new().into(),
            shape: vec![u64::MAX; 100_000],
            dtype: 1,
        }),
        trace_ids: vec!["a".into()],
        positions: Vec::new(),
        provenance: None,
    };
    let e = decode_trace_batch(batch).unwrap_err().to_string();
    assert!(e.len() < 300, "{} bytes: {}", e.len(), &e[..200]);
    assert!(e.contains("100000 dimensions"), "{e}");
}
