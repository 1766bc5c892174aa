//! One training loop for every task: plan the generation, resume from the committed
//! checkpoint, then per optimizer step: the task's micro-steps (accumulated), one exchange
//! with the other ranks, AdamW, the hooks, a report, and a checkpoint when the policy says so.
//! What pretraining and fine-tuning do differently is their [`Task`].

pub mod accumulate;
pub mod checkpoints;
pub mod finetune;
pub mod plan;
pub mod pretrain;
pub mod reduce;
pub mod task;
pub mod zero;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use simmim_model::backend::precision::autocast;
use simmim_model::weights::snapshot::OptimizerPart;
use simmim_model::weights::{load_state_dict, state_dict_from_safetensors};
use simmim_model::{AdamW, SimMimBackend};
use simmim_proto::checkpoint::{CheckpointBytes, TrainerState};
use simmim_proto::pb::StepMetrics;
use simmim_proto::store::RunStore;
use simmim_proto::Permanent;

use accumulate::accumulate;
use checkpoints::CheckpointPolicy;
use plan::{start_loader, usable_len, RunPlan};
use reduce::{all_reduce, check_replicas, ensure_finite, log_final_weights, Votes};
pub use task::{AfterStep, Hook, MicroStep, Task};

use crate::generation::Generation;

/// Trains `task` for this generation; returns the step it ended at.
pub fn train<B, T>(generation: &Generation, mut task: T, device: B::Device) -> Result<u64>
where
    B: AutodiffBackend,
    B::InnerBackend: SimMimBackend,
    T: Task<B>,
    <T::Model as AutodiffModule<B>>::InnerModule: Send + 'static,
{
    let store = RunStore::open(&generation.run_url)?;
    let dataset = task.train_set()?;
    let run = RunPlan::new(generation, usable_len(&generation.config, &dataset))?;
    let (mut model, mut optimizer, mut state) =
        resume_or_start(generation, &mut task, &store, &run, &device)?;
    let max_steps = generation.config.train.max_steps.unwrap_or(u64::MAX);
    let remaining = run.steps_left(state.cursor(), state.step, max_steps);
    if remaining == 0 {
        return Ok(state.step);
    }
    let end_step = state.step + remaining;
    let (loader, sub_batches) = start_loader(
        generation,
        dataset,
        task.augment()?,
        &run,
        state.cursor(),
        remaining,
        B::InnerBackend::computes_on_host(),
    )?;
    let mut hooks = task.hooks()?;
    let first_step = state.step;
    let mut policy = CheckpointPolicy::new(generation, store.clone(), end_step);
    let skipped_before = state.samples_skipped;
    let per_step = (run.plan.accumulation, generation.config.output.log_samples);
    let precision = generation.config.train.precision;
    while state.step < end_step {
        policy.poll()?;
        still_member(generation)?;
        let started = Instant::now();
        let at = MicroStep::first(state.step, sub_batches);
        let step_data = autocast(precision, || {
            accumulate(&mut task, &model, &loader, (at, per_step), &device)
        })?;
        let votes = Votes {
            loss: step_data.loss,
            stop: generation.link.stop_requested(),
            checkpoint_clock: policy.clock_due(),
        };
        let lr = run.lr(state.cursor());
        let (next, agreed, stats) = if optimizer.shard_layout().is_some() {
            let step = (lr, state.step);
            let pair = (model, step_data.grads);
            zero::step(generation, pair, votes, &mut optimizer, step, &device)?
        } else {
            let reduced = all_reduce(generation, &model, step_data.grads, votes, &device)?;
            ensure_finite(reduced.agreed.loss, state.step)?;
            let (next, stats) = optimizer.step(lr, model, reduced.grads);
            (next, reduced.agreed, stats)
        };
        model = next;
        if state.step == first_step {
            log_optimizer_memory(generation, &optimizer);
        }
        let epoch = state.epoch;
        state.advance(&run.plan);
        state.samples_skipped = skipped_before + loader.skipped();
        let seconds = started.elapsed().as_secs_f64();
        let mut metrics = StepMetrics {
            step: state.step,
            epoch,
            loss: agreed.loss,
            lr,
            grad_norm: stats.grad_norm,
            images_per_sec: run.plan.global_batch() as f64 / seconds,
            data_wait_share: step_data.waited / seconds,
            step_seconds: seconds,
            samples_skipped: state.samples_skipped,
            end_step,
            allreduce_seconds: agreed.seconds,
            sample_ids: step_data.sample_ids,
            ..Default::default()
        };
        let after = AfterStep {
            step: state.step,
            epoch,
            epoch_ended: state.epoch != epoch,
            end_step,
            generation,
            store: &store,
            last_batch: step_data.last_batch.as_ref(),
            device: &device,
        };
        for hook in &mut hooks {
            hook.after_step(&after, &model, &mut metrics)?;
        }
        generation.link.report(metrics);
        check_replicas(generation, &model, state.step)?;
        let votes = (agreed.stop, agreed.checkpoint_clock);
        if policy.due(state.step, votes) {
            let config = task.model_config();
            let whole = match optimizer.shard_layout() {
                None => Some(OptimizerPart::State(&optimizer)),
                Some(_) => zero::gather_optimizer::<B, _>(
                    generation,
                    (&model, config),
                    &optimizer,
                    &device,
                )?
                .map(OptimizerPart::Written),
            };
            if let Some(whole) = whole {
                policy.save::<B, _>(&state, (&model, config), whole)?;
            }
        }
        if agreed.stop {
            tracing::info!(
                step = state.step,
                "stopping as asked (a stop, a regroup or a signal)"
            );
            generation.link.stopped_early();
            break;
        }
    }
    policy.finish()?;
    log_final_weights(&model, state.step)?;
    hooks.iter_mut().for_each(|hook| hook.finish(&store));
    Ok(state.step)
}

/// Fails when the generation is over without us (the coordinator is gone or moved on).
fn still_member(generation: &Generation) -> Result<()> {
    match generation.link.lost() {
        Some(reason) => bail!("{reason}"),
        None => Ok(()),
    }
}

/// Logs what the AdamW moments cost this rank (after the first step, when they exist).
fn log_optimizer_memory<I: burn::tensor::backend::Backend>(
    generation: &Generation,
    optimizer: &AdamW<I>,
) {
    let floats = optimizer.moment_floats();
    let sharded = match optimizer.shard_layout() {
        Some(layout) => format!("sharded over {} ranks", layout.world()),
        None => "not sharded".into(),
    };
    tracing::info!(
        rank = generation.rank,
        moment_floats = floats,
        "optimizer state on this rank: {:.2} MiB of AdamW moments ({sharded})",
        floats as f64 * 4.0 / (1024.0 * 1024.0)
    );
}

/// The model, optimizer and position a generation starts from: the committed checkpoint's,
/// or the task's fresh start.
fn resume_or_start<B: AutodiffBackend, T: Task<B>>(
    generation: &Generation,
    task: &mut T,
    store: &RunStore,
    run: &RunPlan,
    device: &B::Device,
) -> Result<(T::Model, AdamW<B::InnerBackend>, TrainerState)> {
    let (model, mut optimizer) = task.init(device)?;
    if generation.config.train.zero >= 1 {
        if generation.world > 1 {
            optimizer = optimizer.with_shard(zero::layout::<B, _>(generation, &model));
        } else {
            tracing::info!(
                "train.zero: a world of one has nothing to shard over; every moment stays here"
            );
        }
    }
    let Some(pieces) = read_resume(generation, store, &run.config_hash)? else {
        let state = TrainerState::start(&run.plan, &run.config_hash);
        return Ok((task.fresh_start(model)?, optimizer, state));
    };
    let weights = state_dict_from_safetensors(&pieces.model)?;
    let model = load_state_dict(model, task.model_config(), &weights)?;
    let moments = state_dict_from_safetensors(&pieces.optimizer)?;
    optimizer.load_state_dict(&model, &moments, device)?;
    Ok((model, optimizer, pieces.trainer.under(&run.plan)))
}

/// Where a generation starts: a committed checkpoint's bytes and position, or nothing.
fn read_resume(
    generation: &Generation,
    store: &RunStore,
    hash: &str,
) -> Result<Option<CheckpointBytes>> {
    let Some(key) = &generation.resume else {
        return Ok(None);
    };
    let (manifest, pieces) = generation
        .runtime
        .block_on(CheckpointBytes::read(store, key))
        .with_context(|| format!("loading checkpoint {}", store.url_of(key)))?;
    if manifest.config_hash != hash {
        return Err(Permanent(format!(
            "checkpoint {} was made with another config (hash {} vs {hash}); \
             resume with the run's own config or start a new run name",
            store.url_of(key),
            manifest.config_hash
        ))
        .into());
    }
    tracing::info!(
        step = pieces.trainer.step,
        "resuming from {}",
        store.url_of(key)
    );
    Ok(Some(pieces))
}
