//! The one exchange per step: gradients, the loss and the decisions every rank must take
//! together, summed in one buffer; and the periodic check that the replicas agree.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use simmim_model::grads::buckets::{flatten_buckets, unflatten_buckets};
use simmim_model::grads::{host_values, weights_digest};
use simmim_model::SimMimBackend;

use crate::collective::{verify_replicas, CollectiveError};
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

/// Averages the gradients and the loss over all ranks in buckets on the gradients' device;
/// the last bucket also carries the votes.
pub fn all_reduce<B, M>(
    generation: &Generation,
    model: &M,
    grads: GradientsParams,
    votes: Votes,
    device: &B::Device,
) -> Result<Reduced>
where
    B: AutodiffBackend,
    B::InnerBackend: SimMimBackend,
    M: AutodiffModule<B>,
{
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
    let tail = [
        votes.loss as f32,
        f32::from(u8::from(votes.stop)),
        f32::from(u8::from(votes.checkpoint_clock && generation.rank == 0)),
    ];
    let limit = generation.config.workers.bucket_floats();
    let buckets = flatten_buckets::<B, M>(model, &grads, limit, &tail, device);
    drop(grads);
    let scale = 1.0 / world as f32;
    let mut reduced = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let summed = sum_bucket(generation, bucket, device)?;
        reduced.push(summed.mul_scalar(scale));
    }
    let (grads, tail) = unflatten_buckets::<B, M>(model, &reduced, limit, tail.len())?;
    Ok(Reduced {
        loss: f64::from(tail[0]),
        stop: tail[1] > 0.0,
        checkpoint_clock: tail[2] > 0.0,
        grads,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One bucket summed over all ranks: in device memory where the backend lends it and the
/// transport reduces it there (burn-cuda and NCCL), through the host otherwise.
fn sum_bucket<I: SimMimBackend>(
    generation: &Generation,
    bucket: Tensor<I, 1>,
    device: &I::Device,
) -> Result<Tensor<I, 1>> {
    let on_device = generation.with_collective(|collective| {
        I::with_device_memory(bucket.clone().into_primitive().tensor(), |memory| {
            match memory {
                // SAFETY: the backend lends `count` f32 values at `pointer` for the duration
                // of this call, and `bucket` (which owns them) is not used until it returns.
                Some((pointer, count)) => unsafe {
                    collective.all_reduce_device_f32(pointer, count)
                },
                // Every rank must make the same calls: a device transport cannot take this
                // bucket through the host while the others reduce theirs on the device.
                None if collective.reduces_device_memory() => Some(Err(CollectiveError::Setup(
                    "the backend could not lend a gradient bucket's device memory".into(),
                ))),
                None => None,
            }
        })
        .transpose()
    });
    match on_device {
        Ok(Some(())) => return Ok(bucket),
        Ok(None) => {}
        Err(e) => {
            // A timed-out collective may still be writing into the bucket until its abort
            // lands: never hand that memory back to the allocator (one bucket leaks; the
            // generation ends here anyway).
            std::mem::forget(bucket);
            return Err(e);
        }
    }
    let mut values = host_values(bucket.into_data(), || "a gradient bucket".into())?;
    generation.with_collective(|c| c.all_reduce_sum(&mut values))?;
    let n = values.len();
    Ok(Tensor::from_data(TensorData::new(values, [n]), device))
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
