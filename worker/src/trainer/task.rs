//! What differs between pretraining and fine-tuning, as a small trait: the data, the model
//! and its optimizer, one micro-batch's loss and gradients, and the hooks that run after each
//! step (probes, pictures, evaluation). Everything else is the trainer's.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use simmim_model::{AdamW, SimMimConfig};
use simmim_proto::pb::StepMetrics;
use simmim_proto::store::RunStore;

use crate::data::augment::Augment;
use crate::data::dataset::Dataset;
use crate::data::loader::Batch;
use crate::generation::Generation;

/// Where a micro-batch sits in the run.
#[derive(Debug, Clone, Copy)]
pub struct MicroStep {
    /// Optimizer steps done before this one.
    pub step: u64,
    /// Index of the micro-batch within its optimizer step.
    pub micro: usize,
    /// Sub-batches to compute concurrently (`train.compute_threads`).
    pub sub_batches: usize,
}

impl MicroStep {
    /// The first micro-batch of the step after `step` optimizer steps.
    pub fn first(step: u64, sub_batches: usize) -> Self {
        Self {
            step,
            micro: 0,
            sub_batches,
        }
    }
}

pub trait Task<B: AutodiffBackend> {
    type Model: AutodiffModule<B, InnerModule: Send + 'static> + Sync;

    fn model_config(&self) -> &SimMimConfig;

    /// The labelled or unlabelled set the plan draws from; called once per generation.
    fn train_set(&mut self) -> Result<Dataset>;

    /// The loader's per-sample transform.
    fn augment(&self) -> Result<Augment>;

    /// A freshly initialised model and its optimizer (per-parameter learning rates included).
    fn init(&mut self, device: &B::Device) -> Result<(Self::Model, AdamW<B::InnerBackend>)>;

    /// The weights a run starts from when there is no checkpoint to resume (pretrained ones,
    /// for fine-tuning); by default the initialisation itself.
    fn fresh_start(&mut self, model: Self::Model) -> Result<Self::Model> {
        Ok(model)
    }

    /// One micro-batch's mean loss and gradients.
    fn loss_and_grads(
        &mut self,
        model: &Self::Model,
        batch: &mut Batch,
        at: MicroStep,
        device: &B::Device,
    ) -> Result<(f64, GradientsParams)>;

    /// What runs after every optimizer step, in order.
    fn hooks(&mut self) -> Result<Hooks<B, Self::Model>>;
}

/// A task's hooks, run in order after each step.
pub type Hooks<B, M> = Vec<Box<dyn Hook<B, M>>>;

/// The state of the run right after an optimizer step, for hooks.
pub struct AfterStep<'a, B: AutodiffBackend> {
    pub step: u64,
    /// The epoch the step belonged to.
    pub epoch: u64,
    /// The step finished its epoch.
    pub epoch_ended: bool,
    /// The generation's last step.
    pub end_step: u64,
    pub generation: &'a Generation,
    pub store: &'a RunStore,
    /// The step's last micro-batch on this rank.
    pub last_batch: Option<&'a Batch>,
    pub device: &'a B::Device,
}

impl<B: AutodiffBackend> AfterStep<'_, B> {
    /// Every `every` steps, and at the generation's last step.
    pub fn every(&self, every: u64) -> bool {
        (every > 0 && self.step.is_multiple_of(every)) || self.step == self.end_step
    }
}

/// Work after an optimizer step that is not training: a probe, a picture, an evaluation.
/// Hooks run on every rank (collective ones must), and may add to the step's metrics.
pub trait Hook<B: AutodiffBackend, M> {
    fn after_step(
        &mut self,
        at: &AfterStep<'_, B>,
        model: &M,
        metrics: &mut StepMetrics,
    ) -> Result<()>;

    /// The generation is over.
    fn finish(&mut self, _store: &RunStore) {}
}
