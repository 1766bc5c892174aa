//! The train loop, reading like the design's six steps: plan, load, compute, reduce
//! (all-reduce, clip, AdamW), report, checkpoint.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use simmim_model::weights::{load_state_dict, state_dict_from_safetensors};
use simmim_model::{loss_and_grads, mask_tensor, AdamW, InitModel, SimMim, SimMimBackend};
use simmim_proto::pb::StepMetrics;
use simmim_proto::store::RunStore;

use crate::checkpoint::Checkpointer;
use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::loader::Batch;
use crate::eval::EvalSpec;
use crate::probe::{feature_dim, probe, ProbeSets};
use crate::recon;
use crate::session::Session;
use crate::steps::{
    adamw_config, all_reduce, check_replicas, log_final_weights, mean_gradients, read_resume,
    start_loader, submit_checkpoint, sum_over_ranks, usable_len, CheckpointClock, Position,
    RunPlan,
};

/// An error a restart cannot fix (bad config, missing dataset): the worker exits with
/// [`crate::EXIT_DO_NOT_RETRY`] so supervisors stop retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// `e` as a [`Permanent`] error.
pub fn permanent(e: impl std::fmt::Display) -> anyhow::Error {
    Permanent(e.to_string()).into()
}

pub fn train<B>(session: &Session, device: B::Device) -> Result<u64>
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    let config = &session.config;
    let joined = &session.joined;
    let (rank, world) = (joined.rank as usize, joined.world_size as usize);
    let model_config = config.model_config().map_err(permanent)?;
    let store = RunStore::open(&joined.run_url)?;

    let dataset = Dataset::open(&config.data.train, session.runtime.clone()).map_err(permanent)?;
    let dataset_len = usable_len(config, &dataset);
    let run = RunPlan::new(session, dataset_len)?;
    let plan = run.plan;

    let mut model: SimMim<B> = model_config.init(config.run.seed, &device)?;
    let mut optimizer = AdamW::<B::InnerBackend>::new(adamw_config(&config.train));
    let mut at = Position::default();
    if let Some(pieces) = read_resume(session, &store, &run.config_hash)? {
        let weights = state_dict_from_safetensors(&pieces.model)?;
        model = load_state_dict(model, &model_config, &weights)?;
        let moments = state_dict_from_safetensors(&pieces.optimizer)?;
        optimizer.load_state_dict(&model, &moments, &device)?;
        at = Position::resumed(&pieces.trainer);
    }
    let skipped_before = at.samples_skipped;
    let mut cursor = plan.settle(at.cursor);
    let mut step = at.step;
    let mut samples_seen = at.samples_seen;

    // The steps this generation will run: until the schedule's end or train.max_steps.
    let remaining = run.steps_left(cursor, step, config.train.max_steps.unwrap_or(u64::MAX));
    let end_step = step + remaining;
    if remaining == 0 {
        return Ok(step);
    }

    let geometry = model_config.mask_geometry()?;
    let img_size = model_config.encoder.img_size();
    let augment = Augment::new(img_size, geometry);
    let (loader, shards) = start_loader(session, dataset, augment, &run, cursor, remaining)?;
    let grid = geometry.token_grid();

    let probe_sets = match &config.probe {
        Some(p) => {
            let train = p.train.as_deref().unwrap_or(&config.data.train);
            let test = p
                .test
                .as_deref()
                .or(config.data.test.as_deref())
                .unwrap_or_default();
            Some(
                ProbeSets::open(train, test, (p.train_limit, p.test_limit), &session.runtime)
                    .map_err(|e| Permanent(format!("probe: {e}")))?,
            )
        }
        None => None,
    };
    let mut checkpointer = Checkpointer::new(store.clone(), session);
    let mut clock = CheckpointClock::new(&config.checkpoint, end_step);
    while step < end_step {
        checkpointer.reap(false)?;
        if let Some(reason) = session.lost_reason() {
            bail!("{reason}");
        }
        let started = Instant::now();
        let mut waited = 0.0;
        let mut parts = Vec::with_capacity(plan.accumulation);
        let mut loss_sum = 0.0;
        let mut last_batch: Option<Batch> = None;
        let mut sample_ids = Vec::new();
        for _ in 0..plan.accumulation {
            let wait_started = Instant::now();
            let batch = loader
                .next()
                .ok_or_else(|| anyhow!("the data loader stopped early at step {step}"))??;
            waited += wait_started.elapsed().as_secs_f64();
            let b = batch.ids.len();
            let images = Tensor::<B, 4>::from_data(
                TensorData::new(batch.pixels.clone(), [b, 3, img_size, img_size]),
                &device,
            );
            let mask = mask_tensor::<B>(&batch.masks, b, grid, &device);
            let (loss, grads) = loss_and_grads(&model, images, mask, shards);
            loss_sum += loss;
            parts.push(grads);
            if config.output.log_samples {
                sample_ids.extend_from_slice(&batch.ids);
            }
            last_batch = Some(batch);
        }
        let grads = mean_gradients(&model, parts);

        let reduced = all_reduce(
            session,
            &model,
            grads,
            loss_sum / plan.accumulation as f64,
            session.stop.load(Ordering::Relaxed),
            clock.due(),
            &device,
        )?;
        let (loss, stop, clock_due) = (reduced.loss, reduced.stop, reduced.checkpoint_clock);
        let allreduce_seconds = reduced.seconds;
        let grads = reduced.grads;
        if !loss.is_finite() {
            bail!("the loss is {loss} at step {step}; lower train.base_lr or check the data");
        }
        let lr = run.schedule.lr(run.progress.at(cursor));
        let (next, stats) = optimizer.step(lr, model, grads);
        model = next;
        step += 1;
        let epoch = cursor.epoch;
        cursor = plan.advance(cursor);
        samples_seen += plan.global_batch() as u64;
        let seconds = started.elapsed().as_secs_f64();
        let mut metrics = StepMetrics {
            step,
            epoch,
            loss,
            lr,
            grad_norm: stats.grad_norm,
            images_per_sec: plan.global_batch() as f64 / seconds,
            data_wait_share: waited / seconds,
            step_seconds: seconds,
            samples_skipped: skipped_before + loader.skipped(),
            end_step,
            allreduce_seconds,
            sample_ids,
            ..Default::default()
        };
        if let (Some(p), Some(sets)) = (&config.probe, &probe_sets) {
            if step.is_multiple_of(p.every_steps) || step == end_step {
                let started = Instant::now();
                let spec = EvalSpec {
                    img_size,
                    crop_pct: None,
                    batch: 256,
                    rank,
                    world,
                };
                let dim = feature_dim(&model_config.encoder, p.stage);
                let inner = model.valid();
                let (knn, linear) = probe(
                    &inner.encoder,
                    sets,
                    (p.stage, dim, p.k),
                    &spec,
                    &mut |values| sum_over_ranks(session, values),
                    &device,
                )?;
                tracing::info!(
                    step,
                    "probe: k-NN top-1 {:.2}%, linear top-1 {:.2}% ({:.1} s)",
                    100.0 * knn,
                    100.0 * linear,
                    started.elapsed().as_secs_f64()
                );
                metrics.probe_knn_top1 = Some(knn);
                metrics.probe_linear_top1 = Some(linear);
            }
        }
        session.report(metrics);

        let recon_every = config.output.recon_every_steps;
        if rank == 0 && recon_every > 0 && (step.is_multiple_of(recon_every) || step == end_step) {
            if let Some(batch) = &last_batch {
                let n = config.output.recon_images;
                write_recon(
                    session,
                    &store,
                    &model,
                    batch,
                    (img_size, grid, n),
                    step,
                    &device,
                )?;
            }
        }
        check_replicas(session, &model, step)?;
        let due = clock.checkpoint_after(step, stop, clock_due);
        if due && rank == 0 {
            let at = Position {
                step,
                cursor,
                samples_seen,
                samples_skipped: skipped_before + loader.skipped(),
            };
            submit_checkpoint(
                &mut checkpointer,
                &run,
                &at,
                (&model, &model_config),
                &optimizer,
                step == end_step || stop,
            )?;
        }
        if stop {
            tracing::info!(step, "stopping as asked (a stop, a regroup or a signal)");
            session.stopped_early.store(true, Ordering::Relaxed);
            break;
        }
    }
    checkpointer.reap(true)?;
    log_final_weights(&model, step);
    Ok(step)
}

/// `shape` is (image side, token grid side, images to show).
fn write_recon<B: AutodiffBackend + SimMimBackend>(
    session: &Session,
    store: &RunStore,
    model: &SimMim<B>,
    batch: &Batch,
    shape: (usize, usize, usize),
    step: u64,
    device: &B::Device,
) -> Result<()> {
    let (img_size, grid, count) = shape;
    let n = count.min(batch.ids.len()).max(1);
    let per_image = 3 * img_size * img_size;
    let pixels = batch.pixels[..n * per_image].to_vec();
    let masks = batch.masks[..n * grid * grid].to_vec();
    let images = Tensor::<B, 4>::from_data(
        TensorData::new(pixels.clone(), [n, 3, img_size, img_size]),
        device,
    );
    let output = model.forward(images, mask_tensor::<B>(&masks, n, grid, device));
    let predicted: Vec<f32> = output
        .reconstruction
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow!("reading the reconstruction: {e:?}"))?;
    let _: f32 = output.loss.into_scalar().elem();
    let png = recon::grid_png(&pixels, &predicted, &masks, img_size, grid);
    let key = format!("recon/step_{step:08}.png");
    // In the background, one at a time, and never fatal: a picture is not worth a stalled
    // or failed run (during a storage outage pictures are skipped, not queued).
    static UPLOADING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if UPLOADING.swap(true, Ordering::AcqRel) {
        tracing::warn!(
            step,
            "reconstruction picture skipped: the previous one is still uploading"
        );
        return Ok(());
    }
    let store = store.clone();
    session.runtime.spawn(async move {
        if let Err(e) = store.put(&key, png.into()).await {
            tracing::warn!("reconstruction picture not written: {e}");
        }
        UPLOADING.store(false, Ordering::Release);
    });
    Ok(())
}
