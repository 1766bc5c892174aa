//! TensorBoard event files under `<run>/tb/`, written by the coordinator: the one process that
//! sees every step's metrics. Each `metrics.jsonl` scalar goes under a grouped tag (see
//! [`TAGS`]), reconstruction pictures become images at their steps, and the run config is
//! recorded for the hparams dashboard.
//!
//! On a local run directory one file per coordinator process is appended to as steps
//! arrive. Object stores cannot append, so there the records since the last write are put as
//! a new file (rolled) at every checkpoint commit, every 30 s of training, and at the end;
//! file names start with the time, so TensorBoard reads them in the order they were written.
//!
//! Resumption: when a run continues from a checkpoint at step `s` while earlier files hold
//! points past `s` (trained, then lost with a crash), a `SessionLog::START` at `s + 1` is
//! written first; TensorBoard drops every older point at or after that step, so each step
//! shows once, with the value of the run that continued.

mod events;
pub mod record;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use simmim_proto::store::RunStore;
use tokio::sync::{mpsc, oneshot};

pub use events::pb;

/// `metrics.jsonl` keys and their TensorBoard tags.
pub const TAGS: &[(&str, &str)] = &[
    ("loss", "train/loss"),
    ("lr", "train/lr"),
    ("grad_norm", "train/grad_norm"),
    ("epoch", "train/epoch"),
    ("images_per_sec", "perf/images_per_sec"),
    ("data_wait_share", "perf/data_wait_share"),
    ("step_seconds", "perf/step_seconds"),
    ("allreduce_seconds", "perf/allreduce_seconds"),
    ("samples_skipped", "data/samples_skipped"),
    ("generation", "run/generation"),
    ("eval_top1", "eval/top1"),
    ("eval_top5", "eval/top5"),
    ("probe_knn_top1", "probe/knn_top1"),
    ("probe_linear_top1", "probe/linear_top1"),
];
/// The best `eval/top1` so far (fine-tuning): the hparams dashboard's metric.
pub const BEST_TOP1_TAG: &str = "eval/best_top1";
pub const IMAGE_TAG: &str = "recon/original_masked_prediction";
pub const DIR: &str = "tb";
/// How long records may wait before an object-store run rolls a new file.
const ROLL_EVERY: Duration = Duration::from_secs(30);

enum Command {
    Scalars {
        step: u64,
        values: Vec<(&'static str, f32)>,
        top1: Option<f64>,
    },
    Flush,
    Close {
        success: bool,
        done: oneshot::Sender<()>,
    },
}

/// The coordinator's handle on its event-file writer, which runs as its own task.
pub struct TensorBoard {
    tx: mpsc::UnboundedSender<Command>,
}

impl TensorBoard {
    /// Starts the writer for a run resumed at step `resumed_at` (0 for a fresh run).
    pub fn start(store: RunStore, config: &simmim_proto::RunConfig, resumed_at: u64) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics: &[&str] = if config.finetune.is_some() {
            &[BEST_TOP1_TAG, "eval/top1", "train/loss"]
        } else {
            &["train/loss"]
        };
        let mut flat_config = serde_json::to_value(config).unwrap_or_default();
        if let (Some(stats), Some(object)) = (mask_stats(config), flat_config.as_object_mut()) {
            // How hard the masks are, beside the settings that make them (the paper's
            // AvgDist), so runs that differ in their mask can be compared by it.
            object.insert(
                "mask_stats".into(),
                serde_json::json!({ "avg_dist": stats.avg_dist, "masked_ratio": stats.ratio }),
            );
        }
        let hparams = events::hparams_start(&flat_config, metrics);
        let images = config.output.recon_every_steps > 0;
        tokio::spawn(async move {
            let writer = Writer::new(store, images);
            writer.run(rx, resumed_at, hparams).await;
        });
        Self { tx }
    }

    /// One `metrics.jsonl` line as scalars at its step.
    pub fn record(&self, line: &serde_json::Value) {
        let Some(step) = line["step"].as_u64() else {
            return;
        };
        let values = TAGS
            .iter()
            .filter_map(|(key, tag)| Some((*tag, line[*key].as_f64()? as f32)))
            .collect();
        let top1 = line["eval_top1"].as_f64();
        let _ = self.tx.send(Command::Scalars { step, values, top1 });
    }

    /// Makes what was recorded durable and picks up new reconstruction pictures.
    pub fn flush(&self) {
        let _ = self.tx.send(Command::Flush);
    }

    /// Writes the hparams end record and everything pending; waits for the writer.
    pub fn close(&self, success: bool) -> oneshot::Receiver<()> {
        let (done, waiter) = oneshot::channel();
        let _ = self.tx.send(Command::Close { success, done });
        waiter
    }
}

/// What earlier coordinators left under `tb/`.
#[derive(Default)]
struct Previous {
    /// The newest scalar step written.
    last_step: u64,
    image_steps: BTreeSet<u64>,
    /// `eval/top1` by step, for the best-so-far after a resume.
    top1: Vec<(u64, f64)>,
    /// The newest time in an existing file's name (`events.out.tfevents.<secs>....`).
    newest_secs: u64,
}

/// The time field of an event file's name.
fn file_secs(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?;
    name.strip_prefix("events.out.tfevents.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

struct Writer {
    store: RunStore,
    images: bool,
    /// The local file (local run directories), opened on the first write.
    local: Option<std::fs::File>,
    pending: Vec<u8>,
    rolled: u32,
    last_roll: Instant,
    /// Reconstruction pictures already in the event files, by key.
    seen: BTreeSet<String>,
    /// The newest scalar step written: a step at or below it means a restart.
    last_step: u64,
    /// `eval/top1` by step, for `eval/best_top1`.
    top1: Vec<(u64, f64)>,
    stem: String,
    /// The earliest time this writer may put in a file name: after every earlier file's, so
    /// TensorBoard, which reads a folder's files in name order, reads ours last even when a
    /// crashed coordinator's file was opened in the same second (the names would then sort by
    /// host and process id, and the restart's purge could be read before the points it
    /// purges).
    min_secs: u64,
}

impl Writer {
    fn new(store: RunStore, images: bool) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        Self {
            store,
            images,
            local: None,
            pending: Vec::new(),
            rolled: 0,
            last_roll: Instant::now(),
            seen: BTreeSet::new(),
            last_step: 0,
            top1: Vec::new(),
            min_secs: 0,
            stem: format!(
                "{}.{}",
                if host.is_empty() {
                    "coordinator"
                } else {
                    &host
                },
                std::process::id()
            ),
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        resumed_at: u64,
        hparams: Vec<Vec<u8>>,
    ) {
        let previous = self.scan().await;
        self.min_secs = previous.newest_secs + 1;
        self.push(&events::file_version());
        if previous.last_step > resumed_at {
            self.push(&events::session_start(resumed_at + 1));
        }
        self.last_step = resumed_at;
        self.top1 = previous.top1;
        self.top1.retain(|(step, _)| *step <= resumed_at);
        if let Ok(keys) = self.recon_keys().await {
            for (key, step) in keys {
                if step <= resumed_at && previous.image_steps.contains(&step) {
                    self.seen.insert(key);
                }
            }
        }
        for record in &hparams {
            self.push(record);
        }
        self.write(false).await;
        while let Some(command) = rx.recv().await {
            match command {
                Command::Scalars {
                    step,
                    mut values,
                    top1,
                } => {
                    self.note_step(step);
                    if let Some(top1) = top1 {
                        self.top1.push((step, top1));
                        let best = self.top1.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max);
                        values.push((BEST_TOP1_TAG, best as f32));
                    }
                    self.push(&events::scalars(step, &values));
                    let due = self.last_roll.elapsed() > ROLL_EVERY;
                    self.write(!due).await;
                }
                Command::Flush => {
                    self.poll_images().await;
                    self.write(false).await;
                }
                Command::Close { success, done } => {
                    self.poll_images().await;
                    self.push(&events::hparams_end(success));
                    self.write(false).await;
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    /// A scalar event at or below the newest step written: the run restarted from a
    /// checkpoint, so older points from that step on are marked for TensorBoard to drop.
    fn note_step(&mut self, step: u64) {
        if step <= self.last_step {
            self.push(&events::session_start(step));
            self.seen
                .retain(|key| recon_step(key).is_some_and(|s| s < step));
            self.top1.retain(|(s, _)| *s < step);
        }
        self.last_step = step;
    }

    fn push(&mut self, event: &[u8]) {
        record::append_record(&mut self.pending, event);
    }

    /// Writes the pending records: appended to the local file, or (on an object store, when
    /// not `only_local`) put as the next rolled file.
    async fn write(&mut self, only_local: bool) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(dir) = self.store.local_dir() {
            if self.local.is_none() {
                let dir = dir.join(DIR);
                let path = dir.join(format!(
                    "events.out.tfevents.{:010}.{}",
                    self.file_secs(),
                    self.stem
                ));
                let opened = std::fs::create_dir_all(&dir).and_then(|()| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                });
                match opened {
                    Ok(file) => self.local = Some(file),
                    Err(e) => {
                        tracing::warn!("TensorBoard: cannot open {}: {e}", path.display());
                        return;
                    }
                }
            }
            if let Some(file) = &mut self.local {
                match file.write_all(&self.pending) {
                    Ok(()) => self.pending.clear(),
                    Err(e) => tracing::warn!("TensorBoard: cannot append to the event file: {e}"),
                }
            }
            return;
        }
        if only_local {
            return;
        }
        // Each rolled file starts with the version record, as TensorBoard expects.
        let mut file = Vec::with_capacity(self.pending.len() + 64);
        record::append_record(&mut file, &events::file_version());
        file.extend_from_slice(&self.pending);
        let key = format!(
            "{DIR}/events.out.tfevents.{:010}.{}.{:06}",
            self.file_secs(),
            self.stem,
            self.rolled
        );
        match self.store.put(&key, Bytes::from(file)).await {
            Ok(()) => {
                self.pending.clear();
                self.rolled += 1;
                self.last_roll = Instant::now();
            }
            Err(e) => {
                tracing::warn!("TensorBoard: cannot write {key} (kept for the next try): {e}")
            }
        }
    }

    async fn recon_keys(&self) -> Result<Vec<(String, u64)>, simmim_proto::store::StoreError> {
        if !self.images {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .list("recon")
            .await?
            .into_iter()
            .filter_map(|key| Some((key.clone(), recon_step(&key)?)))
            .collect())
    }

    async fn poll_images(&mut self) {
        let keys = match self.recon_keys().await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!("TensorBoard: cannot list reconstruction pictures: {e}");
                return;
            }
        };
        for (key, step) in keys {
            if self.seen.contains(&key) {
                continue;
            }
            match self.store.get(&key).await {
                Ok(png) => match events::png_image(step, IMAGE_TAG, &png) {
                    Some(event) => {
                        self.push(&event);
                        self.seen.insert(key);
                    }
                    None => {
                        tracing::warn!("TensorBoard: {key} is not a PNG; left out");
                        self.seen.insert(key);
                    }
                },
                Err(e) => tracing::warn!("TensorBoard: cannot read {key}: {e}"),
            }
        }
    }

    /// The time for a new file's name: now, or just after every earlier file's.
    fn file_secs(&self) -> u64 {
        (events::now_secs() as u64).max(self.min_secs)
    }

    /// Reads the event files already under `tb/`; a damaged one is reported by name and
    /// offset (TensorBoard itself would stop reading it there without a word).
    async fn scan(&self) -> Previous {
        let mut previous = Previous::default();
        let keys = match self.store.list(DIR).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!("TensorBoard: cannot list {DIR}/: {e}");
                return previous;
            }
        };
        for key in keys.iter().filter(|k| k.contains("tfevents")) {
            previous.newest_secs = previous.newest_secs.max(file_secs(key).unwrap_or(0));
            let bytes = match self.store.get(key).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!("TensorBoard: cannot read {key}: {e}");
                    continue;
                }
            };
            let (records, damage) = match record::read_records(&bytes) {
                Ok(records) => (records, None),
                Err(e) => {
                    let intact = record::read_records(&bytes[..e.offset()]).unwrap_or_default();
                    (intact, Some(e))
                }
            };
            if let Some(e) = damage {
                tracing::warn!(
                    "TensorBoard: {}: {e}; TensorBoard shows nothing of this file past that point",
                    self.store.url_of(key)
                );
            }
            for data in records {
                let Ok(event) = pb::Event::decode(data) else {
                    continue;
                };
                let Some(pb::event::What::Summary(summary)) = event.what else {
                    continue;
                };
                let step = event.step.max(0) as u64;
                for value in summary.value {
                    match value.value {
                        Some(pb::summary::value::Value::Image(_)) => {
                            previous.image_steps.insert(step);
                        }
                        Some(pb::summary::value::Value::SimpleValue(v)) => {
                            previous.last_step = previous.last_step.max(step);
                            if value.tag == "eval/top1" {
                                previous.top1.push((step, f64::from(v)));
                            }
                        }
                        None => {}
                    }
                }
            }
        }
        previous
    }
}

/// The step of `recon/step_00000040.png`.
fn recon_step(key: &str) -> Option<u64> {
    key.strip_prefix("recon/step_")?
        .strip_suffix(".png")?
        .parse()
        .ok()
}

/// The pretraining mask's AvgDist and true masked share over 64 masks of the run's seed,
/// logged once; `None` for a fine-tuning run (it draws no masks) or an invalid model config.
fn mask_stats(config: &simmim_proto::RunConfig) -> Option<simmim_proto::mask::MaskStats> {
    if config.finetune.is_some() {
        return None;
    }
    let geometry = config.model_config().ok()?.mask_geometry().ok()?;
    let stats = simmim_proto::mask::MaskStats::measure(&geometry, config.run.seed, 64);
    tracing::info!(
        "mask: {} strategy, mask patch {} px, {:.3} of the pixels masked, AvgDist {:.2} px",
        geometry.strategy().name(),
        geometry.mask_patch(),
        stats.ratio,
        stats.avg_dist
    );
    Some(stats)
}

#[cfg(test)]
mod tests {
    use super::file_secs;

    /// The time field orders a restarted coordinator's file after a crashed one's.
    #[test]
    fn the_time_field_is_read_from_local_and_rolled_names() {
        assert_eq!(
            file_secs("tb/events.out.tfevents.1765141234.host-1.9876"),
            Some(1_765_141_234)
        );
        assert_eq!(
            file_secs("events.out.tfevents.0000000042.coordinator.77.000003"),
            Some(42)
        );
        assert_eq!(file_secs("tb/notes.txt"), None);
    }
}
