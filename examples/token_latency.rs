//! The in-process cost of a live token: `cargo run --release --example token_latency -- MONITOR_DIR
//! [TOKENS [ROWS]]` loads a fitted monitor (the directory `actwatch fit --out` writes, or a
//! server's `monitors/NAME/fitted`), then per token scores one seeded random row at each site, in
//! site order, through `OpenComputations::score` and completes the computation, as a
//! `StreamScores` stream does without the transport, the score log and the client. Prints the p50
//! / p90 / p99 of a token over `TOKENS` (300 by default) after 20 unmeasured ones, and the mean per
//! site and for the completion. With `ROWS` (1 by default) a step is a batch of `ROWS` traces of
//! as many computations at each site, then their completion: `ROWS = 256` on a one-site monitor
//! is `scripts/bench_service.sh`'s 256-vector `StreamScores` batch without the transport.

use std::path::Path;
use std::time::Instant;

use actwatch_core::{SiteBatch, Vectors};
use actwatch_detect::OpenComputations;

/// Standard normal values from a seeded SplitMix64 (Box-Muller).
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn sample(&mut self) -> f32 {
        let u = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let v = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

const WARMUP: usize = 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: token_latency MONITOR_DIR [TOKENS [ROWS]]")?;
    let tokens: usize = args.next().map_or(Ok(300), |s| s.parse())?;
    let batch_rows: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    let (monitor, _) = actwatch_io::artifact::load_monitor(Path::new(&dir))?;
    let sites: Vec<(String, usize)> = monitor
        .sites()
        .iter()
        .map(|s| (s.name.clone(), s.dim))
        .collect();
    let mut rng = Normal(7);
    let mut latency = Vec::with_capacity(tokens);
    let mut per_site = vec![0.0f64; sites.len() + 1];
    for i in 0..WARMUP + tokens {
        let rows: Vec<Vec<f32>> = sites
            .iter()
            .map(|(_, d)| (0..d * batch_rows).map(|_| rng.sample()).collect())
            .collect();
        let ids: Vec<String> = (0..batch_rows).map(|r| format!("t{i}-{r}")).collect();
        let measured = i >= WARMUP;
        let mut open = OpenComputations::default();
        let start = Instant::now();
        for (si, ((name, d), row)) in sites.iter().zip(rows).enumerate() {
            let t = Instant::now();
            let batch = SiteBatch::new(name.clone(), ids.clone(), None, Vectors::new(*d, row)?)?;
            open.score(&monitor, &batch)?;
            if measured {
                per_site[si] += t.elapsed().as_secs_f64();
            }
        }
        let t = Instant::now();
        let done = open.complete(&monitor, &ids)?;
        assert_eq!(done.len(), batch_rows);
        if measured {
            per_site[sites.len()] += t.elapsed().as_secs_f64();
            latency.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    latency.sort_by(f64::total_cmp);
    let pct = |q: f64| latency[((latency.len() - 1) as f64 * q).round() as usize];
    println!(
        "{tokens} steps of {batch_rows} row(s) at {} sites: p50 {:.3} / p90 {:.3} / p99 {:.3} ms",
        sites.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    let mean_ms = |s: f64| s / tokens as f64 * 1e3;
    for ((name, d), s) in sites.iter().zip(&per_site) {
        println!("  site {name} (d = {d}): {:.3} ms", mean_ms(*s));
    }
    println!("  complete: {:.3} ms", mean_ms(per_site[sites.len()]));
    Ok(())
}
