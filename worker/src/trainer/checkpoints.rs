//! When the trainer saves: every `checkpoint.every_steps`, at the generation's last step, on
//! a stop, and when `checkpoint.every_minutes` have passed (rank 0's clock decides for all,
//! through the step's exchange). How a checkpoint is stored is [`crate::checkpoint`]'s.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use simmim_model::weights::snapshot::OptimizerPart;
use simmim_model::SimMimConfig;
use simmim_proto::checkpoint::TrainerState;
use simmim_proto::run_config::CheckpointSection;
use simmim_proto::store::RunStore;

use crate::checkpoint::{Checkpointer, Pending};
use crate::generation::Generation;

pub struct CheckpointPolicy {
    last: Instant,
    every_minutes: Option<f64>,
    every_steps: u64,
    end_step: u64,
    /// Only rank 0 writes; every rank takes part in the decision.
    writer: Option<Checkpointer>,
    /// The ranks agreed to stop after this step: its checkpoint must land.
    stopping: bool,
}

impl CheckpointPolicy {
    pub fn new(generation: &Generation, store: RunStore, end_step: u64) -> Self {
        let section: &CheckpointSection = &generation.config.checkpoint;
        Self {
            last: Instant::now(),
            every_minutes: section.every_minutes,
            every_steps: section.every_steps,
            end_step,
            writer: (generation.rank == 0).then(|| Checkpointer::new(store, generation)),
            stopping: false,
        }
    }

    /// This rank's vote that the minutes have passed.
    pub fn clock_due(&self) -> bool {
        self.every_minutes
            .is_some_and(|m| self.last.elapsed().as_secs_f64() > m * 60.0)
    }

    /// Collects finished uploads; fails the run when none has landed for too long.
    pub fn poll(&mut self) -> Result<()> {
        match &mut self.writer {
            Some(writer) => writer.reap(false),
            None => Ok(()),
        }
    }

    /// Whether a checkpoint is due after `step`, given the agreed stop and clock votes; every
    /// rank comes to the same answer (a sharded optimizer is gathered by all of them).
    pub fn due(&mut self, step: u64, (stop, clock_due): (bool, bool)) -> bool {
        let due =
            step.is_multiple_of(self.every_steps) || step == self.end_step || stop || clock_due;
        if due {
            self.last = Instant::now();
        }
        self.stopping = stop;
        due
    }

    /// Saves the checkpoint of step `state.step` (rank 0; the others return at once). The step
    /// loop pauses only to take a snapshot; writing and uploading run in the background.
    pub fn save<B, M>(
        &mut self,
        state: &TrainerState,
        (model, model_config): (&M, &SimMimConfig),
        optimizer: OptimizerPart<'_, B::InnerBackend>,
    ) -> Result<()>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        M::InnerModule: Send + 'static,
    {
        let step = state.step;
        let Some(writer) = &mut self.writer else {
            return Ok(());
        };
        let started = Instant::now();
        let pending = Pending::snapshot::<B, M>(state, model, optimizer, model_config);
        tracing::info!(
            step,
            "checkpoint snapshot taken in {:.1} ms; writing and uploading in the background",
            started.elapsed().as_secs_f64() * 1e3
        );
        let last = step == self.end_step || self.stopping;
        writer.submit(pending, last)
    }

    /// Waits for the upload in flight.
    pub fn finish(&mut self) -> Result<()> {
        match &mut self.writer {
            Some(writer) => writer.reap(true),
            None => Ok(()),
        }
    }
}
