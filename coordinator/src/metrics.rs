//! `metrics.jsonl`, one JSON object per optimizer step (rank 0's view), and the live progress
//! line. The coordinator is the single writer: on a local run directory it appends to the
//! file; on an object store it rewrites the object at each checkpoint and at the end.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use simmim_proto::pb::StepMetrics;
use simmim_proto::store::RunStore;

use crate::tensorboard::TensorBoard;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SAMPLES_FILE: &str = "samples.jsonl";

pub struct MetricsSink {
    local: Option<std::fs::File>,
    local_dir: Option<std::path::PathBuf>,
    remote: Option<(RunStore, Vec<u8>)>,
    /// `samples.jsonl` for an object-store run, rewritten with `metrics.jsonl`.
    remote_samples: Vec<u8>,
    bar: ProgressBar,
    last_log: Instant,
    first_step_at: Option<(Instant, u64)>,
    tensorboard: Option<TensorBoard>,
}

impl MetricsSink {
    /// `previous`: an object-store run's existing `metrics.jsonl` and `samples.jsonl`, which
    /// this coordinator continues (it rewrites both objects whole).
    pub fn new(
        store: &RunStore,
        progress: bool,
        tensorboard: Option<TensorBoard>,
        previous: (Vec<u8>, Vec<u8>),
    ) -> std::io::Result<Self> {
        let local = match store.local_dir() {
            Some(dir) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(METRICS_FILE))?,
            ),
            None => None,
        };
        let (previous_metrics, previous_samples) = previous;
        let remote = if local.is_none() {
            Some((store.clone(), previous_metrics))
        } else {
            None
        };
        let bar = ProgressBar::with_draw_target(
            None,
            if progress {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} (ETA {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Ok(Self {
            local,
            local_dir: store.local_dir(),
            remote,
            remote_samples: previous_samples,
            bar,
            last_log: Instant::now(),
            first_step_at: None,
            tensorboard,
        })
    }

    /// One line per rank and step with the sample ids used (`output.log_samples`).
    pub fn record_samples(&mut self, generation: u64, rank: u32, m: &StepMetrics) {
        let line = serde_json::json!({
            "generation": generation,
            "rank": rank,
            "step": m.step,
            "epoch": m.epoch,
            "ids": m.sample_ids,
        });
        let Some(dir) = &self.local_dir else {
            self.remote_samples
                .extend_from_slice(format!("{line}\n").as_bytes());
            return;
        };
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SAMPLES_FILE))
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            tracing::warn!("cannot append to {SAMPLES_FILE}: {e}");
        }
    }

    pub fn record(&mut self, generation: u64, m: &StepMetrics) {
        let line = serde_json::json!({
            "step": m.step,
            "epoch": m.epoch,
            "loss": m.loss,
            "lr": m.lr,
            "grad_norm": m.grad_norm,
            "images_per_sec": m.images_per_sec,
            "data_wait_share": m.data_wait_share,
            "step_seconds": m.step_seconds,
            "allreduce_seconds": m.allreduce_seconds,
            "samples_skipped": m.samples_skipped,
            "generation": generation,
            "time_unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        });
        let mut line = line;
        for (key, value) in [
            ("eval_top1", m.eval_top1),
            ("eval_top5", m.eval_top5),
            ("probe_knn_top1", m.probe_knn_top1),
            ("probe_linear_top1", m.probe_linear_top1),
        ] {
            if let Some(value) = value {
                line[key] = serde_json::json!(value);
            }
        }
        if let (Some(top1), Some(top5)) = (m.eval_top1, m.eval_top5) {
            self.bar.suspend(|| {
                tracing::info!(
                    "step {} epoch {}: test top-1 {:.2}%, top-5 {:.2}%",
                    m.step,
                    m.epoch,
                    100.0 * top1,
                    100.0 * top5
                )
            });
        }
        if let Some(knn) = m.probe_knn_top1 {
            self.bar.suspend(|| {
                tracing::info!(
                    "step {}: probe k-NN top-1 {:.2}%, linear top-1 {:.2}%",
                    m.step,
                    100.0 * knn,
                    100.0 * m.probe_linear_top1.unwrap_or(f64::NAN)
                )
            });
        }
        if let Some(tb) = &self.tensorboard {
            tb.record(&line);
        }
        let mut text = line.to_string();
        text.push('\n');
        if let Some(file) = &mut self.local {
            if let Err(e) = file.write_all(text.as_bytes()) {
                tracing::warn!("cannot append to {METRICS_FILE}: {e}");
            }
        }
        if let Some((_, buffer)) = &mut self.remote {
            buffer.extend_from_slice(text.as_bytes());
        }
        let first = *self.first_step_at.get_or_insert((Instant::now(), m.step));
        self.bar.set_length(m.end_step);
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} img/s  data wait {:.0}%",
            m.loss,
            m.lr,
            m.images_per_sec,
            100.0 * m.data_wait_share
        ));
        if self.bar.is_hidden() && self.last_log.elapsed() > Duration::from_secs(10) {
            self.last_log = Instant::now();
            let done = m.step.saturating_sub(first.1) as f64;
            let eta = if done > 0.0 {
                first.0.elapsed().as_secs_f64() / done * m.end_step.saturating_sub(m.step) as f64
            } else {
                0.0
            };
            tracing::info!(
                "step {}/{} loss {:.4} lr {:.2e} {:.0} img/s data wait {:.0}% ETA {:.0} s",
                m.step,
                m.end_step,
                m.loss,
                m.lr,
                m.images_per_sec,
                100.0 * m.data_wait_share,
                eta
            );
        }
    }

    /// Makes the metrics durable: fsync locally, or rewrite the object remotely.
    pub fn flush(&mut self) {
        if let Some(tb) = &self.tensorboard {
            tb.flush();
        }
        if let Some(file) = &mut self.local {
            let _ = file.sync_data();
        }
        if let Some((store, buffer)) = &self.remote {
            let (store, bytes) = (store.clone(), bytes::Bytes::from(buffer.clone()));
            let samples = (!self.remote_samples.is_empty())
                .then(|| bytes::Bytes::from(self.remote_samples.clone()));
            tokio::spawn(async move {
                if let Err(e) = store.put(METRICS_FILE, bytes).await {
                    tracing::warn!("cannot write {METRICS_FILE}: {e}");
                }
                if let Some(samples) = samples {
                    if let Err(e) = store.put(SAMPLES_FILE, samples).await {
                        tracing::warn!("cannot write {SAMPLES_FILE}: {e}");
                    }
                }
            });
        }
    }

    /// Ends the progress bar and writes what is left; the receiver completes when the
    /// TensorBoard writer (if any) has written its last file.
    pub fn finish(&mut self, success: bool) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.bar.finish();
        self.flush();
        self.tensorboard.as_ref().map(|tb| tb.close(success))
    }
}
