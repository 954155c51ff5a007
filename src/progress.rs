//! Progress bars for long work (the library reports progress through `pipeline::Progress`).

use std::sync::Mutex;

use actwatch_io::pipeline::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Draws an indicatif bar per phase (hidden when stderr is not a terminal).
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: &str, total_rows: u64) {
        let bar = ProgressBar::new(total_rows).with_message(phase.to_string());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        *self.bar.lock().expect("progress lock") = Some(bar);
    }

    fn advance(&self, rows: u64) {
        if let Some(b) = self.bar.lock().expect("progress lock").as_ref() {
            b.inc(rows);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("progress lock").take() {
            b.finish_and_clear();
        }
    }
}
