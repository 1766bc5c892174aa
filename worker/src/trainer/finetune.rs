//! Classifier fine-tuning as a [`Task`]: a pretrained encoder loaded into a classifier,
//! layer-wise learning-rate decay, label smoothing and optional Mixup/CutMix. Scoring the
//! test split at the end of every `eval_every_epochs` epochs, and keeping the best model
//! under `best/`, is a hook.

use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simmim_model::classifier::smoothed_targets;
use simmim_model::optim::layer_decay::lr_scales;
use simmim_model::step::classifier_loss_and_grads;
use simmim_model::weights::naming::parameters;
use simmim_model::weights::{load_pretrained, state_dict, to_safetensors};
use simmim_model::{AdamW, Classifier, InitClassifier, SimMimBackend, SimMimConfig};
use simmim_proto::pb::StepMetrics;
use simmim_proto::plan::mix;
use simmim_proto::run_config::FinetuneSection;
use simmim_proto::store::RunStore;
use simmim_proto::Permanent;

use super::plan::adamw_config;
use super::task::{AfterStep, Hook, Hooks, MicroStep, Task};
use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::loader::Batch;
use crate::data::mix::{mix_batch, MixSpec};
use crate::data::rand_augment::RandAugmentSpec;
use crate::eval::{accuracy_share, EvalSpec};
use crate::generation::Generation;
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

pub struct Finetune<'g> {
    generation: &'g Generation,
    section: FinetuneSection,
    model_config: SimMimConfig,
    train_set: Option<Dataset>,
    test_set: Option<Dataset>,
    classes: usize,
    mix: MixSpec,
}

impl<'g> Finetune<'g> {
    /// Opens the labelled train and test splits and checks they have the same classes.
    pub fn new(generation: &'g Generation) -> Result<Self> {
        let config = &generation.config;
        let section = config
            .finetune
            .clone()
            .ok_or_else(|| anyhow!("not a fine-tuning run"))?;
        let model_config = config.model_config().map_err(Permanent::from_display)?;
        let runtime = generation.runtime.clone();
        let mut train_set =
            Dataset::open(&config.data.train, runtime.clone()).map_err(Permanent::from_display)?;
        let test_location = config.data.test.as_deref().ok_or_else(|| {
            Permanent("data.test: fine-tuning needs the labelled test split".into())
        })?;
        let test_set = Dataset::open(test_location, runtime).map_err(Permanent::from_display)?;
        train_set
            .check_same_classes(&test_set, &format!("data.test ({test_location})"))
            .map_err(Permanent::from_display)?;
        let classes = train_set.classes().len();
        if let Some(per_class) = config.data.labels_per_class {
            train_set = train_set
                .labels_per_class(per_class, config.data.subset_seed)
                .map_err(Permanent::from_display)?;
        }
        let mix = MixSpec {
            mixup: section.mixup,
            cutmix: section.cutmix,
            prob: section.mix_prob,
            switch_prob: section.switch_prob,
        };
        Ok(Self {
            generation,
            section,
            model_config,
            train_set: Some(train_set),
            test_set: Some(test_set),
            classes,
            mix,
        })
    }
}

impl<B> Task<B> for Finetune<'_>
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    type Model = Classifier<B>;

    fn model_config(&self) -> &SimMimConfig {
        &self.model_config
    }

    fn train_set(&mut self) -> Result<Dataset> {
        self.train_set
            .take()
            .ok_or_else(|| anyhow!("the training set was already taken"))
    }

    fn augment(&self) -> Result<Augment> {
        let ft = &self.section;
        Ok(Augment::new(
            self.model_config.encoder.img_size(),
            self.model_config.mask_geometry()?,
        )
        .with_scale(ft.crop_scale)
        .with_rand_augment(ft.rand_augment.map(|ra| RandAugmentSpec {
            layers: ra.layers,
            magnitude: ra.magnitude,
            magnitude_std: ra.magnitude_std,
        })))
    }

    fn init(&mut self, device: &B::Device) -> Result<(Classifier<B>, AdamW<B::InnerBackend>)> {
        let config = &self.generation.config;
        let model: Classifier<B> =
            self.model_config
                .init_classifier(self.classes, config.run.seed, device)?;
        let names: Vec<String> = parameters::<B, Classifier<B>>(&model)
            .into_iter()
            .map(|p| p.name)
            .collect();
        let scales = lr_scales(
            names.iter().map(String::as_str),
            &self.model_config.encoder,
            self.section.layer_decay,
        );
        let optimizer = AdamW::new(adamw_config(&config.train)).with_lr_scales(scales);
        Ok((model, optimizer))
    }

    fn fresh_start(&mut self, model: Classifier<B>) -> Result<Classifier<B>> {
        let Some(source) = &self.section.pretrained else {
            tracing::info!("no finetune.pretrained: training from scratch");
            return Ok(model);
        };
        let (weights, _) = read_weights(source, &self.generation.runtime)
            .map_err(|e| Permanent(format!("finetune.pretrained: {e:#}")))?;
        let (loaded, report) = load_pretrained(model, &self.model_config, weights)
            .map_err(|e| Permanent(format!("finetune.pretrained ({source}): {e}")))?;
        tracing::info!(
            resized = report.resized.len(),
            dropped = report.dropped.len(),
            head_loaded = report.head_loaded,
            "encoder loaded from {source}"
        );
        Ok(loaded)
    }

    fn loss_and_grads(
        &mut self,
        model: &Classifier<B>,
        batch: &mut Batch,
        at: MicroStep,
        device: &B::Device,
    ) -> Result<(f64, GradientsParams)> {
        let generation = self.generation;
        let side = self.model_config.encoder.img_size();
        let b = batch.ids.len();
        let mut targets =
            smoothed_targets(&batch.labels, self.classes, self.section.label_smoothing);
        if self.mix.enabled() {
            // One draw per (seed, step, micro-batch): the same on a resumed run.
            let seed = generation.config.run.seed ^ 0x006d_6978_7570;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(
                mix(seed, at.step),
                (at.micro * generation.world + generation.rank) as u64,
            ));
            mix_batch(&mut batch.pixels, &mut targets, side, &self.mix, &mut rng);
        }
        let images = Tensor::<B, 4>::from_data(
            TensorData::new(std::mem::take(&mut batch.pixels), [b, 3, side, side]),
            device,
        );
        let targets =
            Tensor::<B, 2>::from_data(TensorData::new(targets, [b, self.classes]), device);
        Ok(classifier_loss_and_grads(
            model,
            images,
            targets,
            at.sub_batches,
        ))
    }

    fn hooks(&mut self) -> Result<Hooks<B, Classifier<B>>> {
        let test_set = self
            .test_set
            .take()
            .ok_or_else(|| anyhow!("the test set was already taken"))?;
        let generation = self.generation;
        let store = RunStore::open(&generation.run_url)?;
        let best = generation
            .runtime
            .block_on(store.get(BEST_RECORD))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let location = generation.config.data.test.clone().unwrap_or_default();
        Ok(vec![Box::new(EvalHook {
            test_set,
            location,
            spec: EvalSpec {
                img_size: self.model_config.encoder.img_size(),
                crop_pct: self.section.test_crop_pct,
                batch: EVAL_BATCH,
                rank: generation.rank,
                world: generation.world,
            },
            every_epochs: self.section.eval_every_epochs,
            model_config: self.model_config.clone(),
            best,
        })])
    }
}

/// Scores the test split at the end of an evaluation epoch (and of the generation), all
/// ranks sharing it; rank 0 keeps the best model.
struct EvalHook {
    test_set: Dataset,
    location: String,
    spec: EvalSpec,
    every_epochs: u64,
    model_config: SimMimConfig,
    best: Option<BestRecord>,
}

impl<B> Hook<B, Classifier<B>> for EvalHook
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    fn after_step(
        &mut self,
        at: &AfterStep<'_, B>,
        model: &Classifier<B>,
        metrics: &mut StepMetrics,
    ) -> Result<()> {
        let eval_epoch = at.epoch_ended && (at.epoch + 1).is_multiple_of(self.every_epochs);
        if !eval_epoch && at.step != at.end_step {
            return Ok(());
        }
        let scored = Instant::now();
        let inner = model.valid();
        let mut totals = accuracy_share(&inner, &self.test_set, &self.spec, at.device)
            .map_err(|e| anyhow!("evaluating on {}: {e}", self.location))?;
        at.generation.sum_over_ranks(&mut totals)?;
        let count = f64::from(totals[2]).max(1.0);
        let (top1, top5) = (f64::from(totals[0]) / count, f64::from(totals[1]) / count);
        metrics.eval_top1 = Some(top1);
        metrics.eval_top5 = Some(top5);
        tracing::info!(
            step = at.step,
            epoch = at.epoch,
            "test top-1 {:.2}%, top-5 {:.2}% on {} images ({:.1} s)",
            100.0 * top1,
            100.0 * top5,
            totals[2],
            scored.elapsed().as_secs_f64()
        );
        if at.generation.rank == 0 && self.best.as_ref().is_none_or(|b| top1 > b.top1) {
            let record = BestRecord {
                step: at.step,
                epoch: at.epoch,
                top1,
                top5,
            };
            self.keep_best(at, model, record)?;
        }
        Ok(())
    }

    fn finish(&mut self, store: &RunStore) {
        if let Some(best) = &self.best {
            tracing::info!(
                "best test top-1 {:.2}% (top-5 {:.2}%) at step {} (epoch {}), kept in {}",
                100.0 * best.top1,
                100.0 * best.top5,
                best.step,
                best.epoch,
                store.url_of(BEST_MODEL)
            );
        }
    }
}

impl EvalHook {
    fn keep_best<B: AutodiffBackend>(
        &mut self,
        at: &AfterStep<'_, B>,
        model: &Classifier<B>,
        record: BestRecord,
    ) -> Result<()> {
        let bytes = to_safetensors(
            &state_dict::<B, Classifier<B>>(model, &self.model_config)?,
            &self.model_config,
        )?;
        let json = serde_json::to_vec_pretty(&record)?;
        let store = at.store;
        let saved = at.generation.runtime.block_on(async {
            store.put(BEST_MODEL, bytes.into()).await?;
            store.put(BEST_RECORD, json.into()).await
        });
        match saved {
            Ok(()) => self.best = Some(record),
            Err(e) => tracing::warn!("best model not saved: {e}"),
        }
        Ok(())
    }
}
