//! Byte-level mutations, as a coverage-guided fuzzer makes them, for the seeded suites: each
//! names its position as a fraction of a region of the input (the whole of it, its first or its
//! last bytes: a Parquet footer and its length field live in the last ones), so a mutation means
//! the same thing whatever input it lands on and shrinks towards the region's start.

/// Where in an input a mutation lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    Anywhere,
    /// The first `n` bytes.
    Head(usize),
    /// The last `n` bytes (a Parquet file's footer, a frame's trailer).
    Tail(usize),
}

/// One mutation; `at` is a position in the region, as a fraction `at / 2^32` of its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    FlipBit {
        region: Region,
        at: u32,
        bit: u8,
    },
    SetByte {
        region: Region,
        at: u32,
        value: u8,
    },
    /// Overwrites `width` (1, 2, 4 or 8) bytes with `value`, little-endian: a length, a count,
    /// an offset.
    SetInt {
        region: Region,
        at: u32,
        width: u8,
        value: u64,
    },
    /// Cuts the input at `at`.
    Truncate {
        region: Region,
        at: u32,
    },
    Delete {
        region: Region,
        at: u32,
        len: u16,
    },
    Insert {
        region: Region,
        at: u32,
        bytes: Vec<u8>,
    },
    /// Copies `len` bytes of the input from `from` (a fraction of the whole input) over `at`.
    Duplicate {
        region: Region,
        at: u32,
        from: u32,
        len: u16,
    },
    /// Copies `len` bytes of another input (the donor) from `from` over `at`.
    Splice {
        region: Region,
        at: u32,
        from: u32,
        len: u16,
    },
}

/// Values that break lengths and counts: zero, one, the edges of every integer width.
pub const INTERESTING: [u64; 17] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
];

/// The index a fraction `at / 2^32` of `region` points to in an input of `len` bytes, in
/// `0..=len` (`len` only for an empty region).
fn position(len: usize, region: Region, at: u32) -> usize {
    let (start, n) = match region {
        Region::Anywhere => (0, len),
        Region::Head(n) => (0, n.min(len)),
        Region::Tail(n) => (len - n.min(len), n.min(len)),
    };
    start + ((n as u64 * u64::from(at)) >> 32) as usize
}

fn fraction(len: usize, at: u32) -> usize {
    ((len as u64 * u64::from(at)) >> 32) as usize
}

impl Mutation {
    /// Applies the mutation to `input`; `donor` is where [`Mutation::Splice`] copies from.
    pub fn apply(&self, input: &mut Vec<u8>, donor: &[u8]) {
        let len = input.len();
        match *self {
            Mutation::FlipBit { region, at, bit } => {
                if let Some(b) = input.get_mut(position(len, region, at)) {
                    *b ^= 1 << (bit % 8);
                }
            }
            Mutation::SetByte { region, at, value } => {
                if let Some(b) = input.get_mut(position(len, region, at)) {
                    *b = value;
                }
            }
            Mutation::SetInt {
                region,
                at,
                width,
                value,
            } => {
                let width = match width % 4 {
                    0 => 1,
                    1 => 2,
                    2 => 4,
                    _ => 8,
                };
                let p = position(len, region, at).min(len.saturating_sub(width));
                let end = (p + width).min(len);
                input[p..end].copy_from_slice(&value.to_le_bytes()[..end - p]);
            }
            Mutation::Truncate { region, at } => input.truncate(position(len, region, at)),
            Mutation::Delete { region, at, len: n } => {
                let p = position(len, region, at);
                let end = (p + usize::from(n)).min(len);
                input.drain(p..end);
            }
            Mutation::Insert {
                region,
                at,
                ref bytes,
            } => {
                let p = position(len, region, at);
                input.splice(p..p, bytes.iter().copied());
            }
            Mutation::Duplicate {
                region,
                at,
                from,
                len: n,
            } => {
                let src = fraction(len, from);
                let chunk: Vec<u8> = input[src..(src + usize::from(n)).min(len)].to_vec();
                copy_over(input, position(len, region, at), &chunk);
            }
            Mutation::Splice {
                region,
                at,
                from,
                len: n,
            } => {
                let src = fraction(donor.len(), from);
                let chunk = &donor[src..(src + usize::from(n)).min(donor.len())];
                copy_over(input, position(len, region, at), chunk);
            }
        }
    }
}

/// Overwrites `input` from `at` with `chunk`, growing it if the chunk runs past its end.
fn copy_over(input: &mut Vec<u8>, at: usize, chunk: &[u8]) {
    let end = at + chunk.len();
    if end > input.len() {
        input.resize(end, 0);
    }
    input[at..end].copy_from_slice(chunk);
}

/// `input` with `mutations` applied in order.
pub fn mutated(input: &[u8], mutations: &[Mutation], donor: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for m in mutations {
        m.apply(&mut out, donor);
    }
    out
}

/// Proptest strategies of mutations: `tail` is the size of the region [`Region::Tail`] means
/// (a Parquet footer: a few hundred bytes; a frame's trailer: 32).
pub mod strategy {
    use proptest::prelude::*;

    use super::{Mutation, Region, INTERESTING};

    pub fn region(tail: usize) -> impl Strategy<Value = Region> {
        prop_oneof![
            3 => Just(Region::Anywhere),
            1 => Just(Region::Head(64)),
            2 => Just(Region::Tail(tail)),
            1 => Just(Region::Tail(8)),
        ]
    }

    /// An integer that breaks lengths: one of [`INTERESTING`], or any.
    pub fn int() -> impl Strategy<Value = u64> {
        prop_oneof![3 => proptest::sample::select(&INTERESTING[..]), 1 => any::<u64>()]
    }

    pub fn mutation(tail: usize) -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (region(tail), any::<u32>(), 0u8..8)
                .prop_map(|(region, at, bit)| Mutation::FlipBit { region, at, bit }),
            3 => (region(tail), any::<u32>(), any::<u8>())
                .prop_map(|(region, at, value)| Mutation::SetByte { region, at, value }),
            4 => (region(tail), any::<u32>(), 0u8..4, int()).prop_map(
                |(region, at, width, value)| Mutation::SetInt { region, at, width, value }
            ),
            1 => (region(tail), any::<u32>())
                .prop_map(|(region, at)| Mutation::Truncate { region, at }),
            1 => (region(tail), any::<u32>(), 1u16..64)
                .prop_map(|(region, at, len)| Mutation::Delete { region, at, len }),
            1 => (region(tail), any::<u32>(), proptest::collection::vec(any::<u8>(), 1..16))
                .prop_map(|(region, at, bytes)| Mutation::Insert { region, at, bytes }),
            1 => (region(tail), any::<u32>(), any::<u32>(), 1u16..256).prop_map(
                |(region, at, from, len)| Mutation::Duplicate { region, at, from, len }
            ),
            1 => (region(tail), any::<u32>(), any::<u32>(), 1u16..256).prop_map(
                |(region, at, from, len)| Mutation::Splice { region, at, from, len }
            ),
        ]
    }

    /// A mutation that keeps the input's length (a Parquet footer stays where its length field
    /// says), so more inputs get past their framing into what it frames.
    pub fn in_place(tail: usize) -> impl Strategy<Value = Mutation> {
        let region = prop_oneof![
            3 => Just(Region::Anywhere),
            1 => Just(Region::Head(64)),
            2 => Just(Region::Tail(tail)),
        ];
        (region, any::<u32>(), 0u8..3, 0u8..8, int()).prop_map(|(region, at, kind, bit, value)| {
            match kind {
                0 => Mutation::FlipBit { region, at, bit },
                1 => Mutation::SetByte {
                    region,
                    at,
                    value: value as u8,
                },
                _ => Mutation::SetInt {
                    region,
                    at,
                    width: bit,
                    value,
                },
            }
        })
    }

    /// One to `max` [`in_place`] mutations.
    pub fn in_place_mutations(tail: usize, max: usize) -> impl Strategy<Value = Vec<Mutation>> {
        proptest::collection::vec(in_place(tail), 1..=max)
    }

    /// One to `max` mutations.
    pub fn mutations(tail: usize, max: usize) -> impl Strategy<Value = Vec<Mutation>> {
        proptest::collection::vec(mutation(tail), 1..=max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_stay_in_their_region() {
        assert_eq!(position(10, Region::Anywhere, 0), 0);
        assert_eq!(position(10, Region::Anywhere, u32::MAX), 9);
        assert_eq!(position(10, Region::Tail(4), 0), 6);
        assert_eq!(position(10, Region::Tail(40), u32::MAX), 9);
        assert_eq!(position(10, Region::Head(2), u32::MAX), 1);
        assert_eq!(position(0, Region::Tail(8), 7), 0);
        let mut v = vec![0u8; 6];
        Mutation::SetInt {
            region: Region::Tail(8),
            at: 0,
            width: 2,
            value: 0x0102_0304,
        }
        .apply(&mut v, &[]);
        assert_eq!(v, [4, 3, 2, 1, 0, 0], "a 6-byte input is all tail");
        let mut v = vec![1u8, 2, 3];
        Mutation::Splice {
            region: Region::Anywhere,
            at: u32::MAX,
            from: 0,
            len: 3,
        }
        .apply(&mut v, &[7, 8, 9]);
        assert_eq!(v, [1, 2, 7, 8, 9]);
    }
}
