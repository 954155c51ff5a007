//! Keeping the compute pool awake for a moment after each call.
//!
//! Key decision: after a compute task (`service::compute`: decoding and scoring a batch, a
//! completion) the pool's threads keep polling for new work for a short window, the compute
//! linger ([`DEFAULT_COMPUTE_LINGER`], `actwatch serve --compute-linger-ms`), before rayon lets
//! them sleep, as OpenMP runtimes do after a parallel region (`KMP_BLOCKTIME`,
//! `GOMP_SPINCOUNT`). A scoring call splits its work over the pool's threads (query blocks,
//! reference tiles, the detectors of a site), so its latency is that of the slowest share, and a
//! share waits until a thread that slept since the last call is woken for it. On a virtual
//! machine whose idle vCPUs halt (this project's development VM: a Firecracker guest with
//! `haltpoll.guest_halt_poll_ns=0`) that wake-up took from 0.05 to over 2 ms: `rayon::join` of
//! two 2 ms halves after 5 ms idle ran both halves on one thread in 38 to 93 of 300 joins
//! (`examples/wake_latency.rs`, three runs). The tokens of a live monitor arrive as
//! several calls in quick succession (a batch per site, then a completion), each of which found
//! the pool asleep.
//!
//! Polling costs CPU only inside the window after a call: a stream whose calls follow within it
//! keeps the pool awake; an idle server, or one whose calls are further apart, uses none. While
//! polling, a thread runs any pool work that appears (`rayon::yield_now`) and otherwise yields
//! its core to any other runnable thread (`sched_yield`), so the async runtime's threads and other
//! processes are not held up. The window is one process-wide setting, as the pool is.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The default compute linger: long enough to cover the gap between the calls of an active
/// stream on one machine (a quarter to half a millisecond between a response and the next
/// request on loopback, measured by `scripts/bench_service.py`'s 1-vector case), short against
/// the interval between tokens of a generating model (tens of milliseconds), so that a client
/// that merely keeps a stream open costs nothing. Measured on the 2-core development VM by
/// `scripts/bench_service.sh --linger-ab` (README "Benchmarks"), p50 / p99 without and with it:
/// one token at 4 sites of width 4,096 4.69 / 6.80 and 4.30 / 5.52 ms, a 1-vector batch 0.41 /
/// 0.68 and 0.34 / 0.50 ms, a 16-vector batch 0.75 / 1.50 and 0.62 / 0.90 ms.
pub const DEFAULT_COMPUTE_LINGER: Duration = Duration::from_millis(1);
/// Longest compute linger accepted: a window beyond this would keep cores busy between calls
/// that are seconds apart, with nothing to gain from it.
pub const MAX_COMPUTE_LINGER: Duration = Duration::from_secs(1);

/// The window, in nanoseconds (0: no linger).
static WINDOW_NS: AtomicU64 = AtomicU64::new(DEFAULT_COMPUTE_LINGER.as_nanos() as u64);
/// When the current window ends, in nanoseconds since [`epoch`].
static UNTIL_NS: AtomicU64 = AtomicU64::new(0);
/// Whether the pool's threads were asked to linger and not all have stopped.
static LINGERING: AtomicBool = AtomicBool::new(false);
/// Pool threads still lingering from the last request.
static LEFT: AtomicUsize = AtomicUsize::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Sets the process's compute linger (`actwatch serve` calls it once, from its settings); at most
/// [`MAX_COMPUTE_LINGER`] (larger values are clamped), zero for none.
pub fn set_compute_linger(window: Duration) {
    let window = window.min(MAX_COMPUTE_LINGER);
    WINDOW_NS.store(window.as_nanos() as u64, Ordering::Relaxed);
}

/// The process's compute linger.
pub fn compute_linger() -> Duration {
    Duration::from_nanos(WINDOW_NS.load(Ordering::Relaxed))
}

/// Called at the end of every compute task: extends the window to now plus the linger, and if
/// the pool's threads are not lingering yet, asks each of them to (one broadcast job per
/// thread). A call that extends the window just as the last thread stops is a linger missed, not
/// an error: the next task asks again.
pub(crate) fn after_task() {
    let window = WINDOW_NS.load(Ordering::Relaxed);
    if window == 0 {
        return;
    }
    UNTIL_NS.fetch_max(now_ns().saturating_add(window), Ordering::Relaxed);
    if LINGERING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    LEFT.store(rayon::current_num_threads(), Ordering::Release);
    rayon::spawn_broadcast(|_| {
        while now_ns() < UNTIL_NS.load(Ordering::Relaxed) {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::yield_now();
            }
        }
        if LEFT.fetch_sub(1, Ordering::AcqRel) == 1 {
            LINGERING.store(false, Ordering::Release);
        }
    });
}

/// Whether the pool's threads are lingering (for tests).
#[cfg(test)]
fn lingering() -> bool {
    LINGERING.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test that changes the process-wide window (tests in this binary that score run
    /// with whatever it holds; every value is correct, only the speed differs).
    #[test]
    fn the_pool_lingers_for_the_window_runs_work_meanwhile_and_then_stops() {
        set_compute_linger(Duration::from_secs(5));
        assert_eq!(
            compute_linger(),
            MAX_COMPUTE_LINGER,
            "clamped to the maximum"
        );

        // Other tests of this binary may score meanwhile: start from a pool that is not
        // lingering, so that the threads polling below are the ones this call asked for.
        let settled = |what: &str| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while lingering() {
                assert!(
                    Instant::now() < deadline,
                    "the pool still lingers 30 s later ({what})"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        set_compute_linger(Duration::from_millis(200));
        settled("before");
        after_task();
        assert!(lingering());
        // Work submitted while the threads poll runs, parallel work included.
        let (tx, rx) = std::sync::mpsc::channel();
        rayon::spawn(move || {
            let (a, b) = rayon::join(|| 1 + 1, || 2 + 2);
            tx.send(a + b).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(6));
        // The window ends and every thread stops polling.
        settled("after the window");

        // No window: nothing lingers.
        set_compute_linger(Duration::ZERO);
        settled("with no window");
        after_task();
        assert!(!lingering());
        set_compute_linger(DEFAULT_COMPUTE_LINGER);
    }
}
