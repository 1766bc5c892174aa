//! The prefetching pipeline: a producer thread walks the plan's micro-batches in order and
//! decodes each on a dedicated thread pool, keeping `prefetch` batches ready ahead of the
//! step. Unreadable samples are logged by name, counted, and replaced by a deterministic
//! substitute so the batch keeps its size and every rank stays in step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;
use simmim_proto::plan::{mix, Cursor, DataPlan};

use super::augment::{Augment, Prepared};
use super::dataset::Dataset;
use super::DataError;

/// One micro-batch, ready for the device.
pub struct Batch {
    pub epoch: u64,
    /// `[B, 3, H, W]` row-major.
    pub pixels: Vec<f32>,
    /// `[B, h, w]` token masks, 1 = masked.
    pub masks: Vec<u8>,
    pub ids: Vec<u32>,
    /// The class of each image (ImageFolder order).
    pub labels: Vec<u32>,
}

pub struct Loader {
    batches: Receiver<Result<Batch, DataError>>,
    skipped: Arc<AtomicU64>,
    _producer: std::thread::JoinHandle<()>,
}

/// How many substitutes to try before deciding the dataset itself is broken.
const MAX_SUBSTITUTES: u64 = 16;

pub struct LoaderSpec {
    pub plan: DataPlan,
    pub rank: usize,
    /// Where the first step starts (settled by the plan if it cannot fit a global batch).
    pub first: Cursor,
    /// Optimizer steps to load.
    pub steps: u64,
    pub threads: usize,
    pub prefetch: usize,
}

impl Loader {
    pub fn start(
        dataset: Arc<Dataset>,
        augment: Arc<Augment>,
        spec: LoaderSpec,
    ) -> Result<Self, DataError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(spec.threads.max(1))
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| DataError::Dataset {
                location: "loader".into(),
                reason: format!("cannot start decoding threads: {e}"),
            })?;
        let (tx, rx) = bounded(spec.prefetch.max(1));
        let skipped = Arc::new(AtomicU64::new(0));
        let counter = skipped.clone();
        let producer = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                let plan = spec.plan;
                let mut order_epoch = u64::MAX;
                let mut order = Vec::new();
                let mut cursor = plan.settle(spec.first);
                for _ in 0..spec.steps {
                    let epoch = cursor.epoch;
                    if epoch != order_epoch {
                        order = plan.epoch_order(epoch);
                        order_epoch = epoch;
                    }
                    for micro in 0..plan.accumulation {
                        let ids = plan.ids_at(&order, cursor, spec.rank, micro).to_vec();
                        let batch = pool.install(|| {
                            load_batch(&dataset, &augment, plan.seed, cursor.epoch, ids, &counter)
                        });
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                    cursor = plan.advance(cursor);
                }
            })
            .map_err(|e| DataError::Dataset {
                location: "loader".into(),
                reason: format!("cannot start the loader thread: {e}"),
            })?;
        Ok(Self {
            batches: rx,
            skipped,
            _producer: producer,
        })
    }

    /// The next micro-batch in plan order; `None` when the plan is done.
    pub fn next(&self) -> Option<Result<Batch, DataError>> {
        self.batches.recv().ok()
    }

    /// Samples that could not be read or decoded so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

fn load_batch(
    dataset: &Dataset,
    augment: &Augment,
    seed: u64,
    epoch: u64,
    ids: Vec<u32>,
    skipped: &AtomicU64,
) -> Result<Batch, DataError> {
    let prepared: Vec<Prepared> = ids
        .par_iter()
        .map(|&id| load_sample(dataset, augment, seed, epoch, id, skipped))
        .collect::<Result<_, _>>()?;
    let side = augment.img_size;
    let mut pixels = Vec::with_capacity(ids.len() * 3 * side * side);
    let mut masks = Vec::with_capacity(ids.len() * augment.geometry.token_grid().pow(2));
    let mut labels = Vec::with_capacity(ids.len());
    for p in prepared {
        pixels.extend_from_slice(&p.pixels);
        masks.extend_from_slice(&p.mask);
        labels.push(p.label);
    }
    Ok(Batch {
        epoch,
        pixels,
        masks,
        ids,
        labels,
    })
}

/// Sample `id`, or if it cannot be used, a substitute chosen from `(seed, epoch, id)`.
pub fn load_sample(
    dataset: &Dataset,
    augment: &Augment,
    seed: u64,
    epoch: u64,
    id: u32,
    skipped: &AtomicU64,
) -> Result<Prepared, DataError> {
    let mut candidate = id;
    let mut last_error = None;
    for attempt in 0..=MAX_SUBSTITUTES {
        let result = dataset.read(candidate as usize).and_then(|raw| {
            let mut rng = Augment::sample_rng(seed, epoch, candidate);
            let mut prepared = augment.prepare(&raw.bytes, &raw.name, &mut rng)?;
            prepared.label = raw.label;
            Ok(prepared)
        });
        match result {
            Ok(prepared) => return Ok(prepared),
            Err(e) => {
                skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sample = candidate, "skipping unreadable sample: {e}");
                last_error = Some(e);
                candidate = (mix(mix(seed, epoch), u64::from(id) << 8 | (attempt + 1))
                    % dataset.len() as u64) as u32;
            }
        }
    }
    Err(DataError::Dataset {
        location: "training data".into(),
        reason: format!(
            "{} unreadable samples in a row; last: {}",
            MAX_SUBSTITUTES + 1,
            last_error.map(|e| e.to_string()).unwrap_or_default()
        ),
    })
}
