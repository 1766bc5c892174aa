//! The reconstruction losses of the paper's ablation: L1 (the default), smooth L1 and L2,
//! over the masked pixels or all of them, against the image at full resolution or area-averaged
//! down (the paper's target-resolution ablation), raw or normalised per window (SwinV2's
//! SimMIM).

mod norm_target;

use burn::tensor::{backend::Backend, Tensor};

use crate::config::{LossArea, LossKind, LossSpec};
pub use norm_target::norm_targets;

/// `sum(loss(target, x_rec) * weight) / (sum(weight) + 1e-5) / in_chans`, as the official
/// loss. `weight` is the token mask upsampled to pixels (`area: masked`) or ones (`all`),
/// broadcast over channels. With a `target_resolution`, image and weight are area-averaged
/// down to the reconstruction's size first (a target pixel straddling a mask edge weighs
/// by its masked share); `norm_target` then normalises the target per window.
pub fn reconstruction_loss<B: Backend>(
    spec: &LossSpec,
    patch_size: usize,
    in_chans: usize,
    images: Tensor<B, 4>,
    reconstruction: Tensor<B, 4>,
    mask: Tensor<B, 3>,
) -> Tensor<B, 1> {
    let [batch, rows, cols] = mask.dims();
    let p = patch_size;
    let weight = match spec.area {
        LossArea::Masked => mask
            .reshape([batch, rows, 1, cols, 1])
            .repeat_dim(2, p)
            .repeat_dim(4, p)
            .reshape([batch, 1, rows * p, cols * p]),
        LossArea::All => Tensor::ones([batch, 1, rows * p, cols * p], &mask.device()),
    };
    let side = reconstruction.dims()[2];
    let (mut target, weight) = if side == rows * p {
        (images, weight)
    } else {
        (area_average(images, side), area_average(weight, side))
    };
    if let Some(norm) = spec.norm_target {
        target = norm_targets(target, norm.window);
    }
    let denominator = weight.clone().sum().add_scalar(1e-5);
    let difference = target - reconstruction;
    let per_pixel = match spec.kind {
        LossKind::L1 => difference.abs(),
        LossKind::L2 => difference.clone() * difference,
        LossKind::SmoothL1 => {
            // PyTorch's: 0.5 d^2 / beta below beta, |d| - 0.5 beta from it on.
            let beta = spec.beta;
            let magnitude = difference.abs();
            let quadratic = (magnitude.clone() * magnitude.clone()).mul_scalar(0.5 / beta);
            let linear = magnitude.clone().sub_scalar(0.5 * beta);
            quadratic.mask_where(magnitude.greater_equal_elem(beta), linear)
        }
    };
    (per_pixel * weight)
        .sum()
        .div(denominator)
        .div_scalar(in_chans as f64)
}

/// `[B, C, H, W]` averaged over `H/side` x `W/side` blocks (`F.avg_pool2d` with kernel and
/// stride `H/side`); `side` divides `H` (the config checks it).
fn area_average<B: Backend>(x: Tensor<B, 4>, side: usize) -> Tensor<B, 4> {
    let [batch, channels, height, width] = x.dims();
    let (fy, fx) = (height / side, width / side);
    x.reshape([batch, channels, side, fy, side, fx])
        .mean_dim(5)
        .mean_dim(3)
        .reshape([batch, channels, side, side])
}
