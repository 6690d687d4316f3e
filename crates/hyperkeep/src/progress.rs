//! Progress bars for long work (backup, restore, check --read-data): bytes, rate and ETA on
//! stderr, and only when stderr is a terminal, so logs and pipes never fill with bar redraws.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar that exists only on a terminal; every method is a no-op otherwise. Cheap to share
/// between the engine's worker threads (indicatif's bar is internally synchronised).
pub struct Bar {
    bar: Option<ProgressBar>,
    label: &'static str,
}

impl Bar {
    /// A bar for `label` ("backup", "restore", ...) unless `--no-progress` or stderr is no TTY.
    pub fn new(label: &'static str, disabled: bool) -> Bar {
        let show = !disabled && std::io::stderr().is_terminal();
        Bar {
            bar: show.then(|| {
                let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                b.set_style(Self::style(label));
                b
            }),
            label,
        }
    }

    fn style(label: &str) -> ProgressStyle {
        ProgressStyle::with_template(&format!(
            "{label} {{bar:32}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
    }

    pub fn start(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_style(Self::style(self.label));
            b.set_length(total);
            b.set_position(0);
            b.reset_eta();
        }
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // An error path must not leave a half-drawn bar above the error message.
        self.finish();
    }
}
