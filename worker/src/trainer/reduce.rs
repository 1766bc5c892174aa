//! The one exchange per step: gradients, the loss and the decisions every rank must take
//! together, summed in one buffer; and the periodic check that the replicas agree.

use std::ops::Range;
use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use simmim_model::grads::buckets::{
    flatten_buckets, has_gradient, keep_gradients, unflatten_buckets,
};
use simmim_model::grads::{host_values, weights_digest};
use simmim_model::SimMimBackend;

use crate::collective::{verify_replicas, CollectiveError, Op};
use crate::generation::Generation;

/// What this rank brings to a step's exchange.
pub struct Votes {
    pub loss: f64,
    /// This rank was asked to stop (any rank's vote stops all).
    pub stop: bool,
    /// This rank's checkpoint clock says the minutes have passed (rank 0's vote decides).
    pub checkpoint_clock: bool,
}

/// What the ranks agreed in one step's exchange.
pub struct Agreed {
    /// The loss averaged over the ranks.
    pub loss: f64,
    pub stop: bool,
    pub checkpoint_clock: bool,
    /// Seconds the step spent exchanging.
    pub seconds: f64,
}

/// One step's exchange, after it.
pub struct Reduced {
    pub grads: GradientsParams,
    pub agreed: Agreed,
}

impl Votes {
    /// The votes as values every rank sums: the loss, the stop, and rank 0's clock.
    pub fn to_sum(&self, rank: usize) -> [f32; 3] {
        [
            self.loss as f32,
            f32::from(u8::from(self.stop)),
            f32::from(u8::from(self.checkpoint_clock && rank == 0)),
        ]
    }
}

/// Per parameter, 1 where this rank has a gradient: summed with the votes, so every rank
/// steps the same parameters (those any rank has a gradient for).
pub fn gradient_flags(has_grad: &[bool]) -> impl Iterator<Item = f32> + '_ {
    has_grad.iter().map(|&g| f32::from(u8::from(g)))
}

impl Agreed {
    /// The decisions from the summed votes (see [`Votes::to_sum`]) of `world` ranks.
    pub fn from_sum(sum: &[f32], world: usize, started: Instant) -> Self {
        Self {
            loss: f64::from(sum[0]) / world as f64,
            stop: sum[1] > 0.0,
            checkpoint_clock: sum[2] > 0.0,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
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
            agreed: Agreed {
                loss: votes.loss,
                stop: votes.stop,
                checkpoint_clock: votes.checkpoint_clock,
                seconds: started.elapsed().as_secs_f64(),
            },
        });
    }
    let has_grad = has_gradient::<B, M>(model, &grads);
    let tail: Vec<f32> = votes
        .to_sum(generation.rank)
        .into_iter()
        .chain(gradient_flags(&has_grad))
        .collect();
    let limit = generation.config.workers.bucket_floats();
    let buckets = flatten_buckets::<B, M>(model, grads, limit, &tail, device);
    let scale = 1.0 / world as f32;
    let mut reduced = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let whole = 0..bucket.dims()[0];
        let averaged = (bucket, whole, scale);
        reduced.push(run_on_bucket(generation, Op::AllReduce, averaged, device)?);
    }
    let (mut grads, tail) = unflatten_buckets::<B, M>(model, &reduced, limit, tail.len())?;
    let any_rank: Vec<bool> = tail[3..].iter().map(|&f| f > 0.0).collect();
    keep_gradients::<B, M>(model, &mut grads, &any_rank);
    // The tail was averaged with the buckets: the loss is the mean, the votes still count
    // where they are above zero.
    Ok(Reduced {
        grads,
        agreed: Agreed {
            loss: f64::from(tail[0]),
            stop: tail[1] > 0.0,
            checkpoint_clock: tail[2] > 0.0,
            seconds: started.elapsed().as_secs_f64(),
        },
    })
}

/// `op` over one bucket (see [`Op`]): in device memory where the backend lends it and the
/// transport works there (burn-cuda and NCCL), through the host otherwise. Returns the values
/// at `keep`, times `scale`, in a buffer of their own: a reduce-scatter's caller keeps its own
/// chunk only, and the rest of the bucket is released here (through the host it is never
/// uploaded).
pub fn run_on_bucket<I: SimMimBackend>(
    generation: &Generation,
    op: Op,
    (bucket, keep, scale): (Tensor<I, 1>, Range<usize>, f32),
    device: &I::Device,
) -> Result<Tensor<I, 1>> {
    let on_device = generation.with_collective(|collective| {
        I::with_device_memory(bucket.clone().into_primitive().tensor(), |memory| {
            match memory {
                // SAFETY: the backend lends `count` f32 values at `pointer` for the duration
                // of this call, and `bucket` (which owns them) is not used until it returns.
                Some((pointer, count)) => unsafe {
                    collective.run_on_device_f32(op, pointer, count)
                },
                // Every rank must make the same calls: a device transport cannot take this
                // bucket through the host while the others reduce theirs on the device.
                None if collective.reduces_device_memory() => {
                    Some(Err(CollectiveError::Setup(format!(
                        "the backend could not lend a bucket's device memory for the {}",
                        op.name()
                    ))))
                }
                None => None,
            }
        })
        .transpose()
    });
    match on_device {
        Ok(Some(())) if keep == (0..bucket.dims()[0]) => {
            return Ok(match scale {
                1.0 => bucket,
                _ => bucket.mul_scalar(scale),
            })
        }
        Ok(Some(())) => {
            // Scaled while the bucket is still held, so the result cannot be computed in
            // place into (and keep alive) the whole bucket's memory.
            let kept = bucket.clone().slice(keep).mul_scalar(scale);
            drop(bucket);
            return Ok(kept);
        }
        Ok(None) => {}
        Err(e) => {
            // A timed-out collective may still be writing into the bucket until its abort
            // lands: never hand that memory back to the allocator (one bucket leaks; the
            // generation ends here anyway).
            std::mem::forget(bucket);
            return Err(e);
        }
    }
    let mut values = host_values(bucket.into_data(), || {
        format!("a bucket for the {}", op.name())
    })?;
    generation.with_collective(|c| c.run_on_host(op, &mut values))?;
    if keep != (0..values.len()) {
        values = values
            .get(keep.clone())
            .map(<[f32]>::to_vec)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: {keep:?} is outside the bucket of {}",
                    op.name(),
                    values.len()
                )
            })?;
    }
    if scale != 1.0 {
        values.iter_mut().for_each(|v| *v *= scale);
    }
    let n = values.len();
    Ok(Tensor::from_data(TensorData::new(values, [n]), device))
}

/// Fails on a loss that is not finite, before any weight changes.
pub fn ensure_finite(loss: f64, step: u64) -> Result<()> {
    if !loss.is_finite() {
        anyhow::bail!("the loss is {loss} at step {step}; lower train.base_lr or check the data");
    }
    Ok(())
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
