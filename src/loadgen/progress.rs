//! loadgen: the live progress line on stderr (indicatif), drawn only when stderr is a
//! terminal; on a pipe or file nothing is written, so reports and logs stay clean.

use super::drive::Shared;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const REFRESH: Duration = Duration::from_millis(250);

/// A running progress line; `finish` clears it.
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
    bar: ProgressBar,
}

impl Progress {
    pub fn start(source: Arc<Shared>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress {
                task: None,
                bar: ProgressBar::hidden(),
            };
        }
        let schedule = &source.schedule;
        // Count mode: a bar of attempts; duration mode: a bar of elapsed time.
        let (len, by_count) = match (schedule.limit(), schedule.duration()) {
            (Some(n), _) => (n, true),
            (None, Some(d)) => (u64::try_from(d.as_millis()).unwrap_or(u64::MAX), false),
            (None, None) => (0, false),
        };
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{elapsed:>4} [{bar:20}] {wide_msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        let line = bar.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tick.tick().await;
                let live = &source.recorder.live;
                let hs = live.handshakes.load(Ordering::Relaxed);
                let ok = live.responses.load(Ordering::Relaxed);
                let err = live.errors.load(Ordering::Relaxed);
                let secs = source.schedule.start().elapsed().as_secs_f64().max(1e-3);
                line.set_position(if by_count {
                    ok + err
                } else {
                    u64::try_from(source.schedule.start().elapsed().as_millis()).unwrap_or(u64::MAX)
                });
                line.set_message(format!(
                    "{hs} hs {:.0}/s | {ok} req {:.0}/s | {err} err",
                    hs as f64 / secs,
                    ok as f64 / secs
                ));
            }
        });
        Progress {
            task: Some(task),
            bar,
        }
    }

    pub fn finish(self) {
        if let Some(task) = self.task {
            task.abort();
        }
        self.bar.finish_and_clear();
    }
}
