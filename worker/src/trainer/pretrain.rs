//! SimMIM pretraining as a [`Task`]: masked images in, masked-pixel L1 loss out; the k-NN and
//! linear probes and the reconstruction pictures are hooks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use simmim_model::{
    mask_tensor, step::loss_and_grads_with, AdamW, InitModel, SimMim, SimMimBackend, SimMimConfig,
};
use simmim_proto::pb::StepMetrics;
use simmim_proto::run_config::ProbeSection;
use simmim_proto::Permanent;

use super::plan::adamw_config;
use super::task::{AfterStep, Hook, Hooks, MicroStep, Task};
use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::loader::Batch;
use crate::eval::EvalSpec;
use crate::generation::Generation;
use crate::probe::{feature_dim, probe, ProbeSets};
use crate::recon;

pub struct Pretrain<'g> {
    generation: &'g Generation,
    model_config: SimMimConfig,
    /// Image side and token-grid side, fixed by the model config.
    side: usize,
    grid: usize,
}

impl<'g> Pretrain<'g> {
    pub fn new(generation: &'g Generation) -> Result<Self> {
        let model_config = generation
            .config
            .model_config()
            .map_err(Permanent::from_display)?;
        let grid = model_config
            .mask_geometry()
            .map_err(Permanent::from_display)?
            .token_grid();
        Ok(Self {
            generation,
            side: model_config.encoder.img_size(),
            grid,
            model_config,
        })
    }
}

impl<B> Task<B> for Pretrain<'_>
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    type Model = SimMim<B>;

    fn model_config(&self) -> &SimMimConfig {
        &self.model_config
    }

    fn train_set(&mut self) -> Result<Dataset> {
        let generation = self.generation;
        Ok(
            Dataset::open(&generation.config.data.train, generation.runtime.clone())
                .map_err(Permanent::from_display)?,
        )
    }

    fn augment(&self) -> Result<Augment> {
        Ok(Augment::new(
            self.model_config.encoder.img_size(),
            self.model_config.mask_geometry()?,
        ))
    }

    fn init(&mut self, device: &B::Device) -> Result<(SimMim<B>, AdamW<B::InnerBackend>)> {
        let config = &self.generation.config;
        let model = self.model_config.init(config.run.seed, device)?;
        Ok((model, AdamW::new(adamw_config(&config.train))))
    }

    fn loss_and_grads(
        &mut self,
        model: &SimMim<B>,
        batch: &mut Batch,
        at: MicroStep,
        device: &B::Device,
    ) -> Result<(f64, GradientsParams)> {
        let (side, grid) = (self.side, self.grid);
        let b = batch.ids.len();
        let images = Tensor::<B, 4>::from_data(
            TensorData::new(batch.pixels.clone(), [b, 3, side, side]),
            device,
        );
        let mask = mask_tensor::<B>(&batch.masks, b, grid, device);
        let checkpointing = self.generation.config.train.activation_checkpointing;
        Ok(loss_and_grads_with(
            model,
            images,
            mask,
            at.sub_batches,
            checkpointing,
        ))
    }

    fn hooks(&mut self) -> Result<Hooks<B, SimMim<B>>> {
        let config = &self.generation.config;
        let mut hooks: Hooks<B, SimMim<B>> = Vec::new();
        if let Some(section) = &config.probe {
            hooks.push(Box::new(ProbeHook::open(
                self.generation,
                section,
                &self.model_config,
            )?));
        }
        let every = config.output.recon_every_steps;
        if self.generation.rank == 0 && every > 0 {
            hooks.push(Box::new(ReconHook {
                every,
                images: config.output.recon_images,
                model_config: self.model_config.clone(),
            }));
        }
        Ok(hooks)
    }
}

/// k-NN and linear-probe accuracy of the encoder's frozen features, every
/// `probe.every_steps`, all ranks sharing the work.
struct ProbeHook {
    sets: ProbeSets,
    section: ProbeSection,
    dim: usize,
    img_size: usize,
}

impl ProbeHook {
    fn open(generation: &Generation, p: &ProbeSection, model: &SimMimConfig) -> Result<Self> {
        let config = &generation.config;
        let train = p.train.as_deref().unwrap_or(&config.data.train);
        let test = p
            .test
            .as_deref()
            .or(config.data.test.as_deref())
            .unwrap_or_default();
        let sets = ProbeSets::open(
            train,
            test,
            (p.train_limit, p.test_limit),
            &generation.runtime,
        )
        .map_err(|e| Permanent(format!("probe: {e}")))?;
        Ok(Self {
            sets,
            section: p.clone(),
            dim: feature_dim(&model.encoder, p.stage),
            img_size: model.encoder.img_size(),
        })
    }
}

impl<B> Hook<B, SimMim<B>> for ProbeHook
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    fn after_step(
        &mut self,
        at: &AfterStep<'_, B>,
        model: &SimMim<B>,
        metrics: &mut StepMetrics,
    ) -> Result<()> {
        if !at.every(self.section.every_steps) {
            return Ok(());
        }
        let started = Instant::now();
        let generation = at.generation;
        let spec = EvalSpec {
            img_size: self.img_size,
            crop_pct: None,
            batch: 256,
            rank: generation.rank,
            world: generation.world,
        };
        let inner = model.valid();
        let (knn, linear) = probe(
            &inner.encoder,
            &self.sets,
            (self.section.stage, self.dim, self.section.k),
            &spec,
            &mut |values| generation.sum_over_ranks(values),
            at.device,
        )?;
        tracing::info!(
            step = at.step,
            "probe: k-NN top-1 {:.2}%, linear top-1 {:.2}% ({:.1} s)",
            100.0 * knn,
            100.0 * linear,
            started.elapsed().as_secs_f64()
        );
        metrics.probe_knn_top1 = Some(knn);
        metrics.probe_linear_top1 = Some(linear);
        Ok(())
    }
}

/// Pictures of what the model reconstructs for the step's last images (rank 0 only).
struct ReconHook {
    every: u64,
    images: usize,
    model_config: SimMimConfig,
}

/// Set while a picture uploads: pictures are skipped, not queued, during a storage outage.
static UPLOADING: AtomicBool = AtomicBool::new(false);

impl<B> Hook<B, SimMim<B>> for ReconHook
where
    B: AutodiffBackend + SimMimBackend,
{
    fn after_step(
        &mut self,
        at: &AfterStep<'_, B>,
        model: &SimMim<B>,
        _metrics: &mut StepMetrics,
    ) -> Result<()> {
        let Some(batch) = at.last_batch.filter(|_| at.every(self.every)) else {
            return Ok(());
        };
        let side = self.model_config.encoder.img_size();
        let grid = self.model_config.mask_geometry()?.token_grid();
        let n = self.images.min(batch.ids.len()).max(1);
        let pixels = batch.pixels[..n * 3 * side * side].to_vec();
        let masks = batch.masks[..n * grid * grid].to_vec();
        let images = Tensor::<B, 4>::from_data(
            TensorData::new(pixels.clone(), [n, 3, side, side]),
            at.device,
        );
        let output = model.forward(images, mask_tensor::<B>(&masks, n, grid, at.device));
        let predicted = model.at_input_size(output.reconstruction, side);
        let predicted = simmim_model::grads::host_values(predicted.into_data(), || {
            "the reconstruction".into()
        })?;
        let png = recon::grid_png(&pixels, &predicted, &masks, side, grid);
        let key = format!("recon/step_{:08}.png", at.step);
        // In the background, one at a time, and never fatal: a picture is not worth a stalled
        // or failed run.
        if UPLOADING.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                step = at.step,
                "reconstruction picture skipped: the previous one is still uploading"
            );
            return Ok(());
        }
        let store = at.store.clone();
        at.generation.runtime.spawn(async move {
            if let Err(e) = store.put(&key, png.into()).await {
                tracing::warn!("reconstruction picture not written: {e}");
            }
            UPLOADING.store(false, Ordering::Release);
        });
        Ok(())
    }
}
