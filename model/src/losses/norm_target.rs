//! Windowed target normalisation, as `norm_targets` in microsoft/Swin-Transformer's SimMIM:
//! each pixel minus the mean of its `window` x `window` neighbourhood, over the square root of
//! that neighbourhood's unbiased variance (+1e-6). Near the border the window holds only the
//! pixels inside the image: its mean ignores the padding, and the variance's `n / (n - 1)`
//! correction counts the real pixels.

use burn::tensor::module::avg_pool2d;
use burn::tensor::{backend::Backend, Tensor};

/// `targets` `[B, C, H, W]` normalised per window; `window` is odd (the config checks it).
pub fn norm_targets<B: Backend>(targets: Tensor<B, 4>, window: usize) -> Tensor<B, 4> {
    let pad = window / 2;
    let pool = |x: Tensor<B, 4>, count_include_pad: bool| {
        avg_pool2d(
            x,
            [window, window],
            [1, 1],
            [pad, pad],
            count_include_pad,
            false,
        )
    };
    let mean = pool(targets.clone(), false);
    let square_mean = pool(targets.clone() * targets.clone(), false);
    // The official code pools ones with count_include_pad=True and scales by window^2: the
    // number of real pixels in each window.
    let count = pool(targets.ones_like(), true).mul_scalar((window * window) as f64);
    let correction = count.clone() / count.sub_scalar(1.0);
    let variance = ((square_mean - mean.clone() * mean.clone()) * correction).clamp_min(0.0);
    (targets - mean) / variance.add_scalar(1e-6).sqrt()
}
