//! The step with optimizer-state sharding (`train.zero: 1`, ZeRO-1): the gradients are
//! reduce-scattered bucket by bucket so each rank receives the averaged gradients of the
//! values it owns, each rank updates those values with its own share of the AdamW moments,
//! and the updated weights are all-gathered. The numbers are the all-reduce step's; each rank
//! holds 1/N of the moments. The layout is [`simmim_model::optim::shard`]'s.
//!
//! Checkpoints stay whole: when one is due every rank all-gathers its moment chunks and rank 0
//! writes the official unsharded layout, which any world size, sharded or not, resumes from.

use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use simmim_model::grads::buckets::{flatten_buckets, has_gradient};
use simmim_model::optim::shard::{params_from_bucket, ShardLayout};
use simmim_model::optim::StepStats;
use simmim_model::{AdamW, SimMimBackend, SimMimConfig};

use super::reduce::{ensure_finite, gradient_flags, run_on_bucket, Agreed, Votes};
use crate::collective::Op;
use crate::generation::Generation;

/// The layout for this rank of `generation`, for `model`'s parameters.
pub fn layout<B: AutodiffBackend, M: AutodiffModule<B>>(
    generation: &Generation,
    model: &M,
) -> ShardLayout {
    ShardLayout::for_module::<B, M>(
        model,
        generation.config.workers.bucket_floats(),
        generation.world,
        generation.rank,
    )
}

/// One sharded exchange and update: returns the updated model, what the ranks agreed, and
/// the step's statistics. Fails, before any weight changes, when the loss is not finite.
pub fn step<B, M>(
    generation: &Generation,
    (model, grads): (M, GradientsParams),
    votes: Votes,
    optimizer: &mut AdamW<B::InnerBackend>,
    (lr, step): (f64, u64),
    device: &B::Device,
) -> Result<(M, Agreed, StepStats)>
where
    B: AutodiffBackend,
    B::InnerBackend: SimMimBackend,
    M: AutodiffModule<B>,
{
    let started = Instant::now();
    let layout = optimizer
        .shard_layout()
        .cloned()
        .ok_or_else(|| anyhow!("a sharded step on an optimizer without a shard layout"))?;
    let world = layout.world();
    let local_grads = has_gradient::<B, M>(&model, &grads);
    let limit = generation.config.workers.bucket_floats();
    let buckets = flatten_buckets::<B, M>(&model, grads, limit, &[], device);
    let scale = 1.0 / world as f32;
    let mut chunks = Vec::with_capacity(buckets.len());
    for (b, bucket) in buckets.into_iter().enumerate() {
        let padded = pad_to(bucket, layout.padded_len(b), device);
        let own = (padded, layout.own_chunk(b), scale);
        chunks.push(run_on_bucket(generation, Op::ReduceScatter, own, device)?);
    }
    // The votes, this rank's share of the squared gradient norm and which parameters have
    // gradients, summed in one go.
    let squared: f32 = match chunks.len() {
        0 => 0.0,
        _ => Tensor::cat(chunks.iter().map(|c| c.clone().square().sum()).collect(), 0)
            .sum()
            .into_scalar()
            .elem(),
    };
    let [loss, stop, clock] = votes.to_sum(generation.rank);
    let mut sums: Vec<f32> = [loss, stop, clock, squared]
        .into_iter()
        .chain(gradient_flags(&local_grads))
        .collect();
    generation.with_collective(|c| c.all_reduce_sum(&mut sums))?;
    let has_grad: Vec<bool> = sums[4..].iter().map(|&f| f > 0.0).collect();
    let agreed_loss = f64::from(sums[0]) / world as f64;
    ensure_finite(agreed_loss, step)?;
    let grad_norm = f64::from(sums[3]).max(0.0).sqrt();

    let (own, stats) =
        optimizer.step_shard::<B, M>(lr, &model, (&chunks, &has_grad), grad_norm, device)?;
    drop(chunks);
    let mut model = model;
    for (b, chunk) in own.into_iter().enumerate() {
        let gathered = all_gather_chunk(generation, (chunk, &layout, b), device)?;
        // A failed gather leaves the model half updated; the generation ends with the error
        // and the next one resumes from the last checkpoint.
        model = params_from_bucket::<B, M>(model, b, &gathered, &layout, &has_grad);
    }
    Ok((model, Agreed::from_sum(&sums, world, started), stats))
}

/// The whole optimizer state, assembled from every rank's share for a checkpoint, as the
/// official unsharded `optimizer.safetensors`: every rank takes part in the all-gathers;
/// rank 0 writes each gathered bucket into the file at once and gets the file, the others
/// `None` (they drop each gathered bucket at once).
pub fn gather_optimizer<B, M>(
    generation: &Generation,
    (model, config): (&M, &SimMimConfig),
    optimizer: &AdamW<B::InnerBackend>,
    device: &B::Device,
) -> Result<Option<Vec<u8>>>
where
    B: AutodiffBackend,
    B::InnerBackend: SimMimBackend,
    M: AutodiffModule<B>,
{
    let layout = optimizer
        .shard_layout()
        .ok_or_else(|| anyhow!("gathering an optimizer that is not sharded"))?;
    // Rank 0's own failures (writing the file) wait until every gather is done: the other
    // ranks are in the same gathers, and leaving them would stall them until the timeout.
    let mut file = match generation.rank {
        0 => Some(optimizer.gathered_file::<B, M>(model, config)),
        _ => None,
    };
    for b in 0..layout.bucket_count() {
        let [first, second] = optimizer.moment_chunks::<B, M>(model, b, device)?;
        let both = [
            all_gather_chunk(generation, (first, layout, b), device)?,
            all_gather_chunk(generation, (second, layout, b), device)?,
        ];
        if let Some(Ok(writer)) = &mut file {
            if let Err(e) = writer.push_bucket(b, both) {
                file = Some(Err(e));
            }
        }
    }
    match file {
        None => Ok(None),
        Some(writer) => Ok(Some(writer.and_then(|w| w.finish())?)),
    }
}

/// `bucket` with zeros appended up to `len` values.
fn pad_to<I: Backend>(bucket: Tensor<I, 1>, len: usize, device: &I::Device) -> Tensor<I, 1> {
    let have = bucket.dims()[0];
    if have >= len {
        return bucket;
    }
    Tensor::cat(vec![bucket, Tensor::zeros([len - have], device)], 0)
}

/// Bucket `b` whole from every rank's chunk of it, `chunk` being this rank's: the chunk is
/// placed in a zeroed padded bucket and all-gathered.
fn all_gather_chunk<I: SimMimBackend>(
    generation: &Generation,
    (chunk, layout, b): (Tensor<I, 1>, &ShardLayout, usize),
    device: &I::Device,
) -> Result<Tensor<I, 1>> {
    let (at, len) = (layout.own_chunk(b), layout.padded_len(b));
    let mut parts = Vec::with_capacity(3);
    if at.start > 0 {
        parts.push(Tensor::zeros([at.start], device));
    }
    parts.push(chunk);
    if at.end < len {
        parts.push(Tensor::zeros([len - at.end], device));
    }
    let placed = match parts.len() {
        1 => parts.remove(0),
        _ => Tensor::cat(parts, 0),
    };
    run_on_bucket(generation, Op::AllGather, (placed, 0..len, 1.0), device)
}
