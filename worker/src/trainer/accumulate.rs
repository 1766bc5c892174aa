//! Gradient accumulation as one wrapper: the micro-batches of an optimizer step go through
//! the task one by one, and what comes out is one step's mean loss and mean gradients, with
//! the time spent waiting for data and the samples used.

use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use simmim_model::SimMimBackend;

use super::task::{MicroStep, Task};
use crate::data::loader::{Batch, Loader};

/// One optimizer step's worth of micro-steps, combined.
pub struct Accumulated {
    pub loss: f64,
    pub grads: GradientsParams,
    /// Seconds spent waiting for the loader.
    pub waited: f64,
    /// The samples of this step on this rank (when `output.log_samples`).
    pub sample_ids: Vec<u32>,
    /// The step's last micro-batch, for pictures.
    pub last_batch: Option<Batch>,
}

/// Runs the `accumulation` micro-steps of the optimizer step `at` and averages them.
pub fn accumulate<B, T>(
    task: &mut T,
    model: &T::Model,
    loader: &Loader,
    (at, (accumulation, log_samples)): (MicroStep, (usize, bool)),
    device: &B::Device,
) -> Result<Accumulated>
where
    B: AutodiffBackend,
    B::InnerBackend: SimMimBackend,
    T: Task<B>,
{
    let mut parts = Vec::with_capacity(accumulation);
    let mut loss_sum = 0.0;
    let mut waited = 0.0;
    let mut sample_ids = Vec::new();
    let mut last_batch = None;
    for micro in 0..accumulation {
        let wait_started = Instant::now();
        let mut batch = loader
            .next()
            .ok_or_else(|| anyhow!("the data loader stopped early at step {}", at.step))??;
        waited += wait_started.elapsed().as_secs_f64();
        let (loss, grads) =
            task.loss_and_grads(model, &mut batch, MicroStep { micro, ..at }, device)?;
        loss_sum += loss;
        parts.push(grads);
        if log_samples {
            sample_ids.extend_from_slice(&batch.ids);
        }
        last_batch = Some(batch);
    }
    let grads = if parts.len() == 1 {
        parts.pop().unwrap_or_default()
    } else {
        let weights = vec![1.0 / parts.len() as f64; parts.len()];
        simmim_model::step::weighted_sum(model, parts, &weights)
    };
    Ok(Accumulated {
        loss: loss_sum / accumulation as f64,
        grads,
        waited,
        sample_ids,
        last_batch,
    })
}
