//! What the pretraining and fine-tuning loops share: the step plan of a generation (data
//! order, schedule, how many steps remain), resuming from a committed checkpoint, the
//! all-reduce of one step's gradients and decisions, and the checkpoint's trainer state.

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use simmim_proto::plan::{Cursor, DataPlan};
use simmim_proto::store::{config_hash, RunStore};

use std::sync::Arc;

use simmim_model::AdamWConfig;
use simmim_proto::run_config::{CheckpointSection, TrainSection};
use simmim_proto::RunConfig;

use crate::checkpoint::{self, CheckpointBytes, TrainerState};
use crate::collective::flat::{flatten, unflatten};
use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderSpec};
use crate::schedule::Schedule;
use crate::session::Session;
use crate::train::Permanent;

/// Where a position in the data is on the schedule, in steps of the configured global batch.
pub struct Progress {
    pub steps_per_epoch: u64,
    pub reference_batch: u64,
}

impl Progress {
    pub fn at(&self, cursor: Cursor) -> f64 {
        (cursor.epoch * self.steps_per_epoch) as f64
            + cursor.offset as f64 / self.reference_batch as f64
    }
}

/// A generation's plan over a dataset of `dataset_len` samples.
pub struct RunPlan {
    pub plan: DataPlan,
    pub progress: Progress,
    pub schedule: Schedule,
    pub config_hash: String,
}

impl RunPlan {
    pub fn new(session: &Session, dataset_len: usize) -> Result<Self> {
        let config = &session.config;
        let joined = &session.joined;
        let plan = DataPlan {
            seed: config.run.seed,
            dataset_len,
            world_size: joined.world_size as usize,
            micro_batch: joined.micro_batch.max(1) as usize,
            accumulation: joined.accumulation.max(1) as usize,
        };
        let reference_batch = joined.reference_global_batch.max(1);
        if plan.steps_per_epoch() == 0 || dataset_len < reference_batch as usize {
            return Err(Permanent(format!(
                "data.train: {dataset_len} samples are fewer than one global batch of {} \
                 (train.micro_batch x train.accumulation x workers)",
                plan.global_batch().max(reference_batch as usize)
            ))
            .into());
        }
        let progress = Progress {
            steps_per_epoch: dataset_len as u64 / reference_batch,
            reference_batch,
        };
        let schedule = Schedule::new(&config.train, progress.steps_per_epoch, joined.lr_scale);
        Ok(Self {
            plan,
            progress,
            schedule,
            config_hash: config_hash(config),
        })
    }

    /// Optimizer steps from `cursor` (at `step`) to the schedule's end or `max_steps`.
    pub fn steps_left(&self, cursor: Cursor, step: u64, max_steps: u64) -> u64 {
        let total = self.schedule.total_steps as f64 - 1e-9;
        let mut remaining = 0u64;
        let mut probe = cursor;
        while self.progress.at(probe) < total && step + remaining < max_steps {
            remaining += 1;
            probe = self.plan.advance(probe);
        }
        remaining
    }
}

/// Where a generation starts: a committed checkpoint's bytes and position, or nothing.
pub fn read_resume(
    session: &Session,
    store: &RunStore,
    hash: &str,
) -> Result<Option<CheckpointBytes>> {
    let Some(resume) = &session.joined.resume else {
        return Ok(None);
    };
    let (manifest, pieces) = session
        .runtime
        .block_on(checkpoint::read(store, &resume.manifest))
        .with_context(|| format!("loading checkpoint {}", store.url_of(&resume.manifest)))?;
    if manifest.config_hash != hash {
        return Err(Permanent(format!(
            "checkpoint {} was made with another config (hash {} vs {hash}); \
             resume with the run's own config or start a new run name",
            store.url_of(&resume.manifest),
            manifest.config_hash
        ))
        .into());
    }
    tracing::info!(
        step = pieces.trainer.step,
        "resuming from {}",
        store.url_of(&resume.manifest)
    );
    Ok(Some(pieces))
}

/// One step's exchange, after it.
pub struct Reduced {
    pub grads: GradientsParams,
    pub loss: f64,
    pub stop: bool,
    pub checkpoint_clock: bool,
    pub seconds: f64,
}

/// Averages the gradients and the loss over all ranks in one buffer, which also carries the
/// decisions every rank must take together: stop (any rank asked), checkpoint now (rank 0's
/// clock says so).
pub fn all_reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
    session: &Session,
    model: &M,
    grads: GradientsParams,
    loss: f64,
    stop_requested: bool,
    checkpoint_clock: bool,
    device: &B::Device,
) -> Result<Reduced> {
    let started = Instant::now();
    let world = session.joined.world_size as usize;
    if world <= 1 {
        return Ok(Reduced {
            grads,
            loss,
            stop: stop_requested,
            checkpoint_clock,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let mut buffer = flatten(model, &grads);
    let n = buffer.len();
    buffer.extend_from_slice(&[
        loss as f32,
        f32::from(u8::from(stop_requested)),
        f32::from(u8::from(checkpoint_clock && session.joined.rank == 0)),
    ]);
    session
        .collective
        .lock()
        .map_err(|_| anyhow!("transport lock poisoned"))?
        .all_reduce_sum(&mut buffer)?;
    let scale = 1.0 / world as f32;
    buffer[..n].iter_mut().for_each(|v| *v *= scale);
    Ok(Reduced {
        loss: f64::from(buffer[n]) / world as f64,
        stop: buffer[n + 1] > 0.0,
        checkpoint_clock: buffer[n + 2] > 0.0,
        grads: unflatten(model, &buffer[..n], device),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Sums `values` over all ranks (counts, gathered features); every rank gets the total.
pub fn sum_over_ranks(session: &Session, values: &mut [f32]) -> Result<()> {
    if session.joined.world_size <= 1 {
        return Ok(());
    }
    session
        .collective
        .lock()
        .map_err(|_| anyhow!("transport lock poisoned"))?
        .all_reduce_sum(values)?;
    Ok(())
}

/// The loop's position for `trainer.json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Position {
    pub step: u64,
    pub cursor: Cursor,
    pub samples_seen: u64,
    pub samples_skipped: u64,
}

impl Position {
    /// Where a checkpoint's trainer state left the loop.
    pub fn resumed(trainer: &TrainerState) -> Self {
        Self {
            step: trainer.step,
            cursor: Cursor {
                epoch: trainer.epoch,
                offset: trainer.epoch_offset,
            },
            samples_seen: trainer.samples_seen,
            samples_skipped: trainer.samples_skipped,
        }
    }
}

/// The run config's optimizer settings.
pub fn adamw_config(train: &TrainSection) -> AdamWConfig {
    AdamWConfig {
        betas: train.betas,
        eps: train.eps,
        weight_decay: train.weight_decay,
        clip_grad: train.clip_grad,
    }
}

/// Samples of `dataset` the plan draws from: all, or the first `data.limit`.
pub fn usable_len(config: &RunConfig, dataset: &Dataset) -> usize {
    config
        .data
        .limit
        .map_or(dataset.len(), |l| l.min(dataset.len()))
}

/// Starts the prefetching loader on this rank's share of `steps` optimizer steps from `first`;
/// returns it with the number of sub-batches to compute concurrently.
pub fn start_loader(
    session: &Session,
    dataset: Dataset,
    augment: Augment,
    run: &RunPlan,
    first: Cursor,
    steps: u64,
) -> Result<(Loader, usize)> {
    let config = &session.config;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let loader = Loader::start(
        Arc::new(dataset),
        Arc::new(augment),
        LoaderSpec {
            plan: run.plan,
            rank: session.joined.rank as usize,
            first,
            steps,
            threads: config.data.loader_threads.unwrap_or(cores),
            prefetch: config.data.prefetch,
        },
    )?;
    Ok((loader, config.train.compute_threads.unwrap_or(2 * cores)))
}

pub fn trainer_state(run: &RunPlan, at: &Position) -> TrainerState {
    TrainerState {
        step: at.step,
        epoch: at.cursor.epoch,
        epoch_offset: at.cursor.offset,
        samples_seen: at.samples_seen,
        world_size: run.plan.world_size as u32,
        micro_batch: run.plan.micro_batch,
        accumulation: run.plan.accumulation,
        seed: run.plan.seed,
        samples_skipped: at.samples_skipped,
        config_hash: run.config_hash.clone(),
        randomness: "every draw derives from (seed, epoch, sample id); nothing else to restore"
            .into(),
    }
}

/// The mean of the accumulation micro-steps' gradients.
pub fn mean_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    mut parts: Vec<GradientsParams>,
) -> GradientsParams {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let weights = vec![1.0 / parts.len() as f64; parts.len()];
    simmim_model::step::weighted_sum(model, parts, &weights)
}

/// Steps between checks that every replica holds the same weights.
const REPLICA_CHECK_EVERY: u64 = 50;

/// Every [`REPLICA_CHECK_EVERY`] steps of a world of several: fails if the ranks' weights
/// differ (a bug or a bad node; continuing would train diverged copies).
pub fn check_replicas<B: AutodiffBackend, M: AutodiffModule<B>>(
    session: &Session,
    model: &M,
    step: u64,
) -> Result<()> {
    if session.joined.world_size <= 1 || !step.is_multiple_of(REPLICA_CHECK_EVERY) {
        return Ok(());
    }
    let mut collective = session
        .collective
        .lock()
        .map_err(|_| anyhow!("transport lock poisoned"))?;
    crate::collective::verify_replicas(
        collective.as_mut(),
        crate::collective::flat::weights_digest(model),
    )?;
    Ok(())
}

/// Logs a digest of the weights this rank ends its generation with: every rank of a
/// generation must log the same one (operators and the multi-host tests compare them).
pub fn log_final_weights<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, step: u64) {
    let digest = crate::collective::flat::weights_digest(model);
    tracing::info!(step, "final weights digest {digest:016x}");
}

/// Serialises a checkpoint of `model` and `optimizer` at `at` and hands it to the
/// background uploader; the step loop pauses only for this copy off the device.
pub fn submit_checkpoint<B, M>(
    checkpointer: &mut checkpoint::Checkpointer,
    run: &RunPlan,
    at: &Position,
    (model, model_config): (&M, &simmim_model::SimMimConfig),
    optimizer: &simmim_model::AdamW<B::InnerBackend>,
    must_land: bool,
) -> Result<()>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Sync,
{
    let started = Instant::now();
    let (weights, moments) = checkpoint::serialise(model, model_config, optimizer)?;
    let pieces = CheckpointBytes {
        model: weights,
        optimizer: moments,
        trainer: trainer_state(run, at),
    };
    tracing::info!(
        step = at.step,
        "checkpoint serialised in {:.2} s ({:.1} MB); uploading in the background",
        started.elapsed().as_secs_f64(),
        (pieces.model.len() + pieces.optimizer.len()) as f64 / 1e6
    );
    checkpointer.submit(pieces, must_land)
}

/// When checkpoints are due: every `checkpoint.every_steps`, at the generation's last step,
/// on a stop, and when `checkpoint.every_minutes` have passed since the last one.
pub struct CheckpointClock {
    last: Instant,
    every_minutes: Option<f64>,
    every_steps: u64,
    end_step: u64,
}

impl CheckpointClock {
    pub fn new(checkpoint: &CheckpointSection, end_step: u64) -> Self {
        Self {
            last: Instant::now(),
            every_minutes: checkpoint.every_minutes,
            every_steps: checkpoint.every_steps,
            end_step,
        }
    }

    /// This rank's vote that the minutes have passed (rank 0's vote decides, through the
    /// all-reduce).
    pub fn due(&self) -> bool {
        self.every_minutes
            .is_some_and(|m| self.last.elapsed().as_secs_f64() > m * 60.0)
    }

    /// Whether `step` ends with a checkpoint, given the agreed stop and clock flags; restarts
    /// the clock when it does.
    pub fn checkpoint_after(&mut self, step: u64, stop: bool, clock_due: bool) -> bool {
        let due =
            step.is_multiple_of(self.every_steps) || step == self.end_step || stop || clock_due;
        if due {
            self.last = Instant::now();
        }
        due
    }
}
