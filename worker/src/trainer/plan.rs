//! A generation's plan: the data order over the training set, the learning-rate schedule in
//! steps of the configured global batch, how many steps remain, and the loader that walks it.

use std::sync::Arc;

use anyhow::Result;
use simmim_model::AdamWConfig;
use simmim_proto::plan::{Cursor, DataPlan};
use simmim_proto::run_config::TrainSection;
use simmim_proto::store::config_hash;
use simmim_proto::{Permanent, RunConfig};

use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderSpec};
use crate::generation::Generation;
use crate::schedule::Schedule;

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
    pub fn new(generation: &Generation, dataset_len: usize) -> Result<Self> {
        let config = &generation.config;
        let shape = generation.batch;
        let plan = DataPlan {
            seed: config.run.seed,
            dataset_len,
            world_size: generation.world,
            micro_batch: shape.micro_batch.max(1),
            accumulation: shape.accumulation.max(1),
        };
        let reference_batch = shape.reference_global_batch.max(1);
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
        let schedule = Schedule::new(&config.train, progress.steps_per_epoch, shape.lr_scale);
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

    /// The learning rate at `cursor`.
    pub fn lr(&self, cursor: Cursor) -> f64 {
        self.schedule.lr(self.progress.at(cursor))
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

/// Sub-batches each micro-batch is split into and computed concurrently:
/// `train.compute_threads` where set; otherwise twice the cores when the kernels run on the
/// host (a sub-batch waiting in a narrow kernel leaves its cores to the others), and the whole
/// batch on a GPU, where splitting it only shrinks every kernel and multiplies the launches.
pub fn sub_batches(configured: Option<usize>, computes_on_host: bool, cores: usize) -> usize {
    match (configured, computes_on_host) {
        (Some(n), false) if n > 1 => {
            tracing::warn!(
                "train.compute_threads: {n} sub-batches on a GPU run one after another as \
                 {n} smaller streams of kernels, each too small to fill the device, with {n} \
                 times the launches; leave it unset to compute the batch whole"
            );
            n
        }
        (Some(n), _) => n,
        (None, true) => 2 * cores,
        (None, false) => 1,
    }
}

/// Starts the prefetching loader on this rank's share of `steps` optimizer steps from `first`;
/// returns it with the number of sub-batches to compute concurrently ([`sub_batches`]).
pub fn start_loader(
    generation: &Generation,
    dataset: Dataset,
    augment: Augment,
    run: &RunPlan,
    first: Cursor,
    steps: u64,
    computes_on_host: bool,
) -> Result<(Loader, usize)> {
    let config = &generation.config;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let loader = Loader::start(
        Arc::new(dataset),
        Arc::new(augment),
        LoaderSpec {
            plan: run.plan,
            rank: generation.rank,
            first,
            steps,
            threads: config.data.loader_threads.unwrap_or(cores),
            prefetch: config.data.prefetch,
        },
    )?;
    let sub_batches = sub_batches(config.train.compute_threads, computes_on_host, cores);
    Ok((loader, sub_batches))
}

#[cfg(test)]
mod tests {
    use super::sub_batches;

    #[test]
    fn a_gpu_computes_the_batch_whole_unless_asked() {
        assert_eq!(sub_batches(None, true, 16), 32, "CPU: twice the cores");
        assert_eq!(
            sub_batches(None, false, 16),
            1,
            "GPU: one batch, whatever the host"
        );
        assert_eq!(sub_batches(Some(3), true, 16), 3);
        assert_eq!(
            sub_batches(Some(4), false, 16),
            4,
            "asked for: kept, with a warning"
        );
        assert_eq!(sub_batches(Some(1), false, 16), 1);
    }
}
