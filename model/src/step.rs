//! Loss and gradients of one batch, optionally computed as sub-batches on parallel threads.
//!
//! burn-flex runs elementwise kernels on one thread; only matmuls and a few reductions use
//! rayon, so one forward/backward keeps about 1.1 of 2 cores busy (measured). Splitting the
//! batch across threads, each with its own autodiff graph over the same weights, and
//! averaging the gradients puts every core to work. The result is the full-batch gradient:
//! each sub-batch's masked-L1 loss is weighted by its share of the masked pixels, so the sum
//! equals the full-batch loss up to the loss's 1e-5 guard term.

use std::sync::{Mutex, PoisonError};

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::backend::SimMimBackend;
use crate::classifier::{soft_cross_entropy, Classifier};
use crate::recompute::recomputed_loss_and_grads;
use crate::simmim::SimMim;
use simmim_proto::run_config::ActivationCheckpointing;

/// Loss (as a number) and gradients for `images` `[B, C, H, W]` and `mask` `[B, h, w]`,
/// computed as `sub_batches` slices concurrently (clamped to `1..=B`).
pub fn loss_and_grads<B: AutodiffBackend + SimMimBackend>(
    model: &SimMim<B>,
    images: Tensor<B, 4>,
    mask: Tensor<B, 3>,
    sub_batches: usize,
) -> (f64, GradientsParams)
where
    B::InnerBackend: SimMimBackend,
{
    loss_and_grads_with(
        model,
        images,
        mask,
        sub_batches,
        ActivationCheckpointing::None,
    )
}

/// [`loss_and_grads`], with each block's activations kept or computed again in the backward
/// pass ([`crate::recompute`]).
pub fn loss_and_grads_with<B: AutodiffBackend + SimMimBackend>(
    model: &SimMim<B>,
    images: Tensor<B, 4>,
    mask: Tensor<B, 3>,
    sub_batches: usize,
    checkpointing: ActivationCheckpointing,
) -> (f64, GradientsParams)
where
    B::InnerBackend: SimMimBackend,
{
    let batch = images.dims()[0];
    in_sub_batches(model, batch, sub_batches, |replica, start, len| {
        let mask = mask.clone().narrow(0, start, len);
        // Each sub-batch's loss is a mean over its masked pixels: weight by their count (read
        // only where there are several sub-batches).
        let masked = mask.clone().sum();
        let images = images.clone().narrow(0, start, len);
        match checkpointing {
            ActivationCheckpointing::None => {
                let loss = replica.forward(images, mask).loss;
                let grads = loss.backward();
                (loss, masked, GradientsParams::from_grads(grads, replica))
            }
            ActivationCheckpointing::Blocks => {
                let (loss, grads) = recomputed_loss_and_grads(replica, images, mask);
                (loss, masked, grads)
            }
        }
    })
}

/// Cross-entropy against soft targets `[B, classes]` and its gradients for a classifier,
/// as sub-batches on `sub_batches` threads.
pub fn classifier_loss_and_grads<B: AutodiffBackend + SimMimBackend>(
    model: &Classifier<B>,
    images: Tensor<B, 4>,
    targets: Tensor<B, 2>,
    sub_batches: usize,
) -> (f64, GradientsParams)
where
    B::InnerBackend: SimMimBackend,
{
    let batch = images.dims()[0];
    let device = images.device();
    in_sub_batches(model, batch, sub_batches, |replica, start, len| {
        let logits = replica.forward(images.clone().narrow(0, start, len));
        let loss = soft_cross_entropy(logits, targets.clone().narrow(0, start, len));
        let grads = loss.backward();
        let grads = GradientsParams::from_grads(grads, replica);
        (loss, Tensor::from_floats([len as f32], &device), grads)
    })
}

/// Runs `pass(replica, start, len)` (a loss after its backward pass, its weight, the
/// gradients) for `sub_batches` slices of a batch of `batch`, each on its own thread with its
/// own autodiff graph, and combines the losses and gradients weighted by those weights: the
/// full batch's loss and gradient.
///
/// The loss is read back to the host after the backward pass is queued, not between the
/// passes: on a GPU the read waits for the device, and the backward's launches then overlap
/// the forward's kernels instead of starting after an idle device. The one-batch path reads
/// nothing else (the weight is only read when there are several parts to combine).
fn in_sub_batches<B, M, F>(
    model: &M,
    batch: usize,
    sub_batches: usize,
    forward: F,
) -> (f64, GradientsParams)
where
    B: AutodiffBackend,
    B::InnerBackend: SimMimBackend,
    M: AutodiffModule<B> + Send,
    F: Fn(&M, usize, usize) -> (Tensor<B, 1>, Tensor<B, 1>, GradientsParams) + Sync,
{
    let sub_batches = sub_batches.clamp(1, batch.max(1));
    if sub_batches == 1 {
        let (loss_tensor, _, grads) = forward(model, 0, batch);
        let loss: f64 = loss_tensor.into_scalar().elem();
        return (loss, grads);
    }
    let forward = &forward;
    // Sub-batch threads compute as their caller does (see `precision`).
    let precision = crate::backend::precision::current();
    let pools = part_pools(sub_batches);
    let results: Vec<(f64, f64, GradientsParams)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..sub_batches)
            .map(|part| {
                let start = part * batch / sub_batches;
                let len = (part + 1) * batch / sub_batches - start;
                // A replica with fresh autodiff leaves: each thread builds its own graph.
                let replica = M::from_inner(model.valid());
                let pool = pools.as_deref().map(|pools| &pools[part]);
                scope.spawn(move || {
                    let run = move || {
                        let (loss_tensor, weight, grads) =
                            crate::backend::precision::autocast(precision, || {
                                forward(&replica, start, len)
                            });
                        let loss: f64 = loss_tensor.into_scalar().elem();
                        let weight: f64 = weight.into_scalar().elem();
                        (loss, weight, grads)
                    };
                    match pool {
                        Some(pool) => pool.install(run),
                        None => run(),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    return_part_pools(pools);

    let total: f64 = results.iter().map(|(_, w, _)| w).sum();
    let weights: Vec<f64> = results
        .iter()
        .map(|(_, w, _)| {
            if total > 0.0 {
                w / total
            } else {
                1.0 / sub_batches as f64
            }
        })
        .collect();
    let loss = results
        .iter()
        .zip(&weights)
        .map(|((l, _, _), w)| l * w)
        .sum();
    let parts: Vec<GradientsParams> = results.into_iter().map(|(_, _, g)| g).collect();
    (loss, weighted_sum::<B, M>(model, parts, &weights))
}

/// One rayon pool per sub-batch, each with its share of the cores (one thread when there are
/// at least as many sub-batches as cores), kept for the next step. A sub-batch runs inside
/// its pool, so the parallel kernels it calls (burn-flex's matmuls, ours) split their work
/// over that share on the spot. Called from plain threads instead, every parallel kernel
/// handed its work to rayon's global pool and slept until a pool thread had done it: perf
/// showed the cores a third idle on swin_tiny while total work was below PyTorch's.
/// `None` when the threads cannot be started: the sub-batches then use the global pool.
/// Give the pools back with [`return_part_pools`].
fn part_pools(parts: usize) -> Option<Vec<rayon::ThreadPool>> {
    let cached = POOLS.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(pools) = cached.filter(|pools| pools.len() == parts) {
        return Some(pools);
    }
    let cores = crate::backend::kernels::rows::cores();
    (0..parts)
        .map(|part| {
            // The cores left over by the division go one each to the first pools.
            let threads = (cores / parts + usize::from(part < cores % parts)).max(1);
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("sub-batch-{part}-{i}"))
                .build()
                .ok()
        })
        .collect()
}

/// The pools of the last call, taken by the next one: a concurrent caller builds its own
/// instead of sharing threads (where one sub-batch could end up running on top of another).
static POOLS: Mutex<Option<Vec<rayon::ThreadPool>>> = Mutex::new(None);

/// Keeps the pools for the next step (after a panic they are dropped and built again).
fn return_part_pools(pools: Option<Vec<rayon::ThreadPool>>) {
    if let Some(pools) = pools {
        *POOLS.lock().unwrap_or_else(PoisonError::into_inner) = Some(pools);
    }
}

/// `sum_i weights[i] * grads[i]`, parameter by parameter: sub-batch gradients into the
/// batch's, or accumulation micro-steps into the optimizer step's.
pub fn weighted_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    mut parts: Vec<GradientsParams>,
    weights: &[f64],
) -> GradientsParams
where
    B::InnerBackend: SimMimBackend,
{
    struct Summer<'a> {
        parts: &'a mut [GradientsParams],
        weights: &'a [f64],
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Summer<'_>
    where
        B::InnerBackend: SimMimBackend,
    {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let (grads, weights): (Vec<_>, Vec<f64>) = self
                .parts
                .iter_mut()
                .zip(self.weights)
                .filter_map(|(part, &w)| {
                    let grad = part.remove::<B::InnerBackend, D>(param.id)?;
                    Some((grad.into_primitive().tensor(), w))
                })
                .unzip();
            if let Some(total) = B::InnerBackend::weighted_sum(grads, &weights) {
                self.out
                    .register(param.id, crate::backend::float::<B::InnerBackend, D>(total));
            }
        }
    }
    let mut summer = Summer {
        parts: &mut parts,
        weights,
        out: GradientsParams::new(),
    };
    model.visit(&mut summer);
    summer.out
}
