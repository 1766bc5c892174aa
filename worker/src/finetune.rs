//! Fine-tuning: the pretraining loop's machinery (plan, all-reduce, checkpoints, resume,
//! generations) around a classifier. Loads a pretrained encoder, trains with layer-wise
//! learning-rate decay, label smoothing and optional Mixup/CutMix, scores top-1/top-5 on the
//! test split at the end of every epoch, and keeps the best model under `best/`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simmim_model::classifier::smoothed_targets;
use simmim_model::layer_decay::lr_scales;
use simmim_model::naming::parameters;
use simmim_model::step::classifier_loss_and_grads;
use simmim_model::weights::{
    load_pretrained, load_state_dict, state_dict, state_dict_from_safetensors, to_safetensors,
};
use simmim_model::{AdamW, Classifier, InitClassifier, SimMimBackend};
use simmim_proto::pb::StepMetrics;
use simmim_proto::plan::mix;
use simmim_proto::run_config::FinetuneSection;
use simmim_proto::store::RunStore;

use crate::checkpoint::Checkpointer;
use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::mix::{mix_batch, MixSpec};
use crate::data::rand_augment::RandAugmentSpec;
use crate::eval::{accuracy_share, EvalSpec};
use crate::session::Session;
use crate::steps::{
    adamw_config, all_reduce, check_replicas, log_final_weights, mean_gradients, read_resume,
    start_loader, submit_checkpoint, sum_over_ranks, usable_len, CheckpointClock, Position,
    RunPlan,
};
use crate::train::permanent;
use crate::weights_source::read_weights;

/// Where the best model by test top-1 is kept (outside the checkpoint rotation).
pub const BEST_MODEL: &str = "best/model.safetensors";
pub const BEST_RECORD: &str = "best/best.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BestRecord {
    pub step: u64,
    pub epoch: u64,
    pub top1: f64,
    pub top5: f64,
}

/// Images per forward pass when scoring the test split.
const EVAL_BATCH: usize = 256;

pub fn finetune<B>(session: &Session, device: B::Device) -> Result<u64>
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    let config = &session.config;
    let ft: &FinetuneSection = config
        .finetune
        .as_ref()
        .ok_or_else(|| anyhow!("not a fine-tuning run"))?;
    let joined = &session.joined;
    let (rank, world) = (joined.rank as usize, joined.world_size as usize);
    let model_config = config.model_config().map_err(permanent)?;
    let store = RunStore::open(&joined.run_url)?;

    let mut train_set =
        Dataset::open(&config.data.train, session.runtime.clone()).map_err(permanent)?;
    let test_location = config
        .data
        .test
        .as_deref()
        .ok_or_else(|| permanent("data.test: fine-tuning needs the labelled test split"))?;
    let test_set = Dataset::open(test_location, session.runtime.clone()).map_err(permanent)?;
    train_set
        .check_same_classes(&test_set, &format!("data.test ({test_location})"))
        .map_err(permanent)?;
    let classes = train_set.classes().len();
    if let Some(per_class) = config.data.labels_per_class {
        train_set = train_set
            .labels_per_class(per_class, config.data.subset_seed)
            .map_err(permanent)?;
    }
    let dataset_len = usable_len(config, &train_set);
    let run = RunPlan::new(session, dataset_len)?;
    let plan = run.plan;

    let mut model: Classifier<B> =
        model_config.init_classifier(classes, config.run.seed, &device)?;
    let names: Vec<String> = parameters::<B, Classifier<B>>(&model)
        .into_iter()
        .map(|p| p.name)
        .collect();
    let scales = lr_scales(
        names.iter().map(String::as_str),
        &model_config.encoder,
        ft.layer_decay,
    );
    let mut optimizer =
        AdamW::<B::InnerBackend>::new(adamw_config(&config.train)).with_lr_scales(scales);

    let mut at = Position::default();
    if let Some(pieces) = read_resume(session, &store, &run.config_hash)? {
        model = load_state_dict(
            model,
            &model_config,
            &state_dict_from_safetensors(&pieces.model)?,
        )?;
        optimizer.load_state_dict(
            &model,
            &state_dict_from_safetensors(&pieces.optimizer)?,
            &device,
        )?;
        at = Position::resumed(&pieces.trainer);
    } else if let Some(source) = &ft.pretrained {
        let (weights, _) = read_weights(source, &session.runtime)
            .map_err(|e| permanent(format!("finetune.pretrained: {e:#}")))?;
        let (loaded, report) = load_pretrained(model, &model_config, weights)
            .map_err(|e| permanent(format!("finetune.pretrained ({source}): {e}")))?;
        model = loaded;
        tracing::info!(
            resized = report.resized.len(),
            dropped = report.dropped.len(),
            head_loaded = report.head_loaded,
            "encoder loaded from {source}"
        );
    } else {
        tracing::info!("no finetune.pretrained: training from scratch");
    }
    let mut best: Option<BestRecord> = session
        .runtime
        .block_on(store.get(BEST_RECORD))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());

    let skipped_before = at.samples_skipped;
    let mut cursor = plan.settle(at.cursor);
    let mut step = at.step;
    let mut samples_seen = at.samples_seen;
    let remaining = run.steps_left(cursor, step, config.train.max_steps.unwrap_or(u64::MAX));
    let end_step = step + remaining;
    if remaining == 0 {
        return Ok(step);
    }

    let img_size = model_config.encoder.img_size();
    let augment = Augment::new(img_size, model_config.mask_geometry()?)
        .with_scale(ft.crop_scale)
        .with_rand_augment(ft.rand_augment.map(|ra| RandAugmentSpec {
            layers: ra.layers,
            magnitude: ra.magnitude,
            magnitude_std: ra.magnitude_std,
        }));
    let (loader, shards) = start_loader(session, train_set, augment, &run, cursor, remaining)?;
    let mix_spec = MixSpec {
        mixup: ft.mixup,
        cutmix: ft.cutmix,
        prob: ft.mix_prob,
        switch_prob: ft.switch_prob,
    };
    let eval_spec = EvalSpec {
        img_size,
        crop_pct: ft.test_crop_pct,
        batch: EVAL_BATCH,
        rank,
        world,
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
        let mut sample_ids = Vec::new();
        for micro in 0..plan.accumulation {
            let wait_started = Instant::now();
            let mut batch = loader
                .next()
                .ok_or_else(|| anyhow!("the data loader stopped early at step {step}"))??;
            waited += wait_started.elapsed().as_secs_f64();
            let b = batch.ids.len();
            let mut targets = smoothed_targets(&batch.labels, classes, ft.label_smoothing);
            if mix_spec.enabled() {
                // One draw per (seed, step, micro-batch): the same on a resumed run.
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(
                    mix(plan.seed ^ 0x006d_6978_7570, step),
                    (micro * world + rank) as u64,
                ));
                mix_batch(
                    &mut batch.pixels,
                    &mut targets,
                    img_size,
                    &mix_spec,
                    &mut rng,
                );
            }
            let images = Tensor::<B, 4>::from_data(
                TensorData::new(batch.pixels, [b, 3, img_size, img_size]),
                &device,
            );
            let targets =
                Tensor::<B, 2>::from_data(TensorData::new(targets, [b, classes]), &device);
            let (loss, grads) = classifier_loss_and_grads(&model, images, targets, shards);
            loss_sum += loss;
            parts.push(grads);
            if config.output.log_samples {
                sample_ids.extend_from_slice(&batch.ids);
            }
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
        if !reduced.loss.is_finite() {
            bail!(
                "the loss is {} at step {step}; lower train.base_lr or check the data",
                reduced.loss
            );
        }
        let lr = run.schedule.lr(run.progress.at(cursor));
        let (next, stats) = optimizer.step(lr, model, reduced.grads);
        model = next;
        step += 1;
        let epoch = cursor.epoch;
        cursor = plan.advance(cursor);
        samples_seen += plan.global_batch() as u64;
        let train_seconds = started.elapsed().as_secs_f64();

        // The end of an epoch (or of the run): score the test split, all ranks sharing it.
        let mut metrics = StepMetrics {
            step,
            epoch,
            loss: reduced.loss,
            lr,
            grad_norm: stats.grad_norm,
            images_per_sec: plan.global_batch() as f64 / train_seconds,
            data_wait_share: waited / train_seconds,
            step_seconds: train_seconds,
            samples_skipped: skipped_before + loader.skipped(),
            end_step,
            allreduce_seconds: reduced.seconds,
            sample_ids,
            ..Default::default()
        };
        let epoch_done = cursor.epoch != epoch && (epoch + 1) % ft.eval_every_epochs == 0;
        if epoch_done || step == end_step {
            let scored = Instant::now();
            let inner = model.valid();
            let mut totals = accuracy_share(&inner, &test_set, &eval_spec, &device)
                .map_err(|e| anyhow!("evaluating on {test_location}: {e}"))?;
            sum_over_ranks(session, &mut totals)?;
            let count = f64::from(totals[2]).max(1.0);
            let (top1, top5) = (f64::from(totals[0]) / count, f64::from(totals[1]) / count);
            metrics.eval_top1 = Some(top1);
            metrics.eval_top5 = Some(top5);
            tracing::info!(
                step,
                epoch,
                "test top-1 {:.2}%, top-5 {:.2}% on {} images ({:.1} s)",
                100.0 * top1,
                100.0 * top5,
                totals[2],
                scored.elapsed().as_secs_f64()
            );
            if rank == 0 && best.as_ref().is_none_or(|b| top1 > b.top1) {
                let record = BestRecord {
                    step,
                    epoch,
                    top1,
                    top5,
                };
                let bytes = to_safetensors(
                    &state_dict::<B, Classifier<B>>(&model, &model_config),
                    &model_config,
                )?;
                let json = serde_json::to_vec_pretty(&record)?;
                let saved = session.runtime.block_on(async {
                    store.put(BEST_MODEL, bytes.into()).await?;
                    store.put(BEST_RECORD, json.into()).await
                });
                match saved {
                    Ok(_) => best = Some(record),
                    Err(e) => tracing::warn!("best model not saved: {e}"),
                }
            }
        }
        session.report(metrics);

        check_replicas(session, &model, step)?;
        let stop = reduced.stop;
        let due = clock.checkpoint_after(step, stop, reduced.checkpoint_clock);
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
    if let Some(best) = &best {
        tracing::info!(
            "best test top-1 {:.2}% (top-5 {:.2}%) at step {} (epoch {}), kept in {}",
            100.0 * best.top1,
            100.0 * best.top5,
            best.step,
            best.epoch,
            store.url_of(BEST_MODEL)
        );
    }
    Ok(step)
}
