//! The one exchange per step: gradients, the loss and the decisions every rank must take
//! together, summed in one buffer; and the periodic check that the replicas agree.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use simmim_model::grads::{flatten, unflatten, weights_digest};

use crate::collective::verify_replicas;
use crate::generation::Generation;

/// What this rank brings to a step's exchange.
pub struct Votes {
    pub loss: f64,
    /// This rank was asked to stop (any rank's vote stops all).
    pub stop: bool,
    /// This rank's checkpoint clock says the minutes have passed (rank 0's vote decides).
    pub checkpoint_clock: bool,
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
/// votes.
pub fn all_reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
    generation: &Generation,
    model: &M,
    grads: GradientsParams,
    votes: Votes,
    device: &B::Device,
) -> Result<Reduced> {
    let started = Instant::now();
    let world = generation.world;
    if world <= 1 {
        return Ok(Reduced {
            grads,
            loss: votes.loss,
            stop: votes.stop,
            checkpoint_clock: votes.checkpoint_clock,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let mut buffer = flatten(model, &grads)?;
    let n = buffer.len();
    buffer.extend_from_slice(&[
        votes.loss as f32,
        f32::from(u8::from(votes.stop)),
        f32::from(u8::from(votes.checkpoint_clock && generation.rank == 0)),
    ]);
    generation.with_collective(|c| c.all_reduce_sum(&mut buffer))?;
    let scale = 1.0 / world as f32;
    buffer[..n].iter_mut().for_each(|v| *v *= scale);
    Ok(Reduced {
        loss: f64::from(buffer[n]) / world as f64,
        stop: buffer[n + 1] > 0.0,
        checkpoint_clock: buffer[n + 2] > 0.0,
        grads: unflatten(model, &buffer[..n], device)?,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Steps between checks that every replica holds the same weights.
const REPLICA_CHECK_EVERY: u64 = 50;

/// Every [`REPLICA_CHECK_EVERY`] steps of a world of several: fails if the ranks' weights
/// differ (a bug or a bad node; continuing would train diverged copies).
pub fn check_replicas<B: AutodiffBackend, M: AutodiffModule<B>>(
    generation: &Generation,
    model: &M,
    step: u64,
) -> Result<()> {
    if generation.world <= 1 || !step.is_multiple_of(REPLICA_CHECK_EVERY) {
        return Ok(());
    }
    let digest = weights_digest(model)?;
    generation.with_collective(|c| verify_replicas(c, digest))
}

/// Logs a digest of the weights this rank ends its generation with: every rank of a
/// generation must log the same one (operators and the multi-host tests compare them).
pub fn log_final_weights<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    step: u64,
) -> Result<()> {
    let digest = weights_digest(model)?;
    tracing::info!(step, "final weights digest {digest:016x}");
    Ok(())
}
