//! How often a pool thread that slept is late for parallel work on this machine:
//! `cargo run --release --example wake_latency -- [JOINS [IDLE_MS]]` (defaults 300 and 5) runs
//! `rayon::join` of two halves of 2 ms of busy work, each after `IDLE_MS` of sleep, and prints
//! when the second half started (quantiles) and how many joins ran both halves on one thread. On
//! a machine whose idle cores wake at once the second half starts within microseconds on the
//! other thread; where an idle core takes milliseconds to wake (a VM whose vCPUs halt), the first
//! thread finishes its half and runs the second itself, and the join takes twice as long. This is
//! what the server's compute linger (`crates/actwatch-server/src/linger.rs`) works around. Not a
//! test: nothing here asserts a timing.

use std::time::{Duration, Instant};

fn busy(d: Duration) -> Option<usize> {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
    rayon::current_thread_index()
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("a whole number"))
        .unwrap_or(default)
}

fn main() {
    let (joins, idle) = (
        arg(1, 300).max(1) as usize,
        Duration::from_millis(arg(2, 5)),
    );
    let half = Duration::from_millis(2);
    let mut runs: Vec<(f64, bool)> = (0..joins)
        .map(|_| {
            std::thread::sleep(idle);
            let t0 = Instant::now();
            let (a, (started, b)) = rayon::join(|| busy(half), || (t0.elapsed(), busy(half)));
            (started.as_secs_f64() * 1e3, a == b)
        })
        .collect();
    runs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let q = |p: f64| runs[((runs.len() - 1) as f64 * p).round() as usize].0;
    println!(
        "{joins} joins after {} ms idle on {} threads: second half started after p50 {:.3} / p90 \
         {:.3} / p99 {:.3} ms; both halves on one thread in {} joins",
        idle.as_millis(),
        rayon::current_num_threads(),
        q(0.5),
        q(0.9),
        q(0.99),
        runs.iter().filter(|r| r.1).count()
    );
}
