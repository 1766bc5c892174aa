//! The backends the model runs on, and the ops it brings itself.
//!
//! - Exact (erf) GELU: burn-flex evaluates GELU and its gradient element by element through a
//!   scalar `erff` and `expf` on one thread. The CPU kernel here uses a rational erf
//!   approximation and a range-reduced exp that the compiler vectorises, split across threads.
//! - LayerNorm with a fused backward: Burn's autodiff differentiates LayerNorm through its
//!   decomposition (mean, subtract, square, mean, sqrt, divide, scale, shift), storing each
//!   intermediate and running about fifteen passes backward. Here the forward is the
//!   backend's fused LayerNorm and the backward one pass per row (two on the CPU kernel).
//!
//! - Softmax over the last dimension with a fused backward (`y * (g - sum(g * y))` per row)
//!   instead of the decomposition's max, subtract, exp, sum and divide.
//!
//! Backends without their own kernels use Burn's ops through the trait's defaults.
//!
//! The trait's defaults are Burn's ops (`decomposed`); `flex` is the CPU backend's kernels
//! (`kernels`), `autodiff` their backward passes, `cuda` the GPU backend's memory hooks.

mod autodiff;
#[cfg(feature = "cuda")]
mod cuda;
pub mod decomposed;
mod flex;
#[cfg(feature = "cuda")]
pub mod kernel_cache;
pub(crate) mod kernels;
pub mod precision;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

#[cfg(feature = "cuda")]
pub use cuda::cuda_driver_present;
pub use decomposed::AdamWUpdate;
use decomposed::{
    adamw_update_decomposed, layer_norm_backward_decomposed, softmax_backward_decomposed,
    weighted_sum_decomposed,
};

/// A primitive float tensor as a `Tensor` of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A Burn backend the SimMIM model can run on.
pub trait SimMimBackend: Backend {
    /// `x * Φ(x)` with the exact normal CDF, as `torch.nn.GELU()`.
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad * d/dx[x * Φ(x)]`.
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }

    /// Softmax over the last dimension.
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let last = x.shape().num_dims() - 1;
        Self::softmax(x, last)
    }

    /// Gradient of [`Self::softmax_last`] from its output `y`: `y * (grad - sum(grad * y))`.
    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_backward_decomposed::<Self>(y, grad)
    }

    /// LayerNorm over the last dimension (biased variance, as PyTorch).
    fn layer_norm_affine(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        Self::layer_norm(x, gamma, Some(beta), epsilon)
    }

    /// Gradients of [`Self::layer_norm_affine`] with respect to `x`, `gamma` and `beta`.
    fn layer_norm_affine_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 3] {
        layer_norm_backward_decomposed::<Self>(x, gamma, grad, epsilon)
    }

    /// Whether [`Self::qkv_attention`] is this backend's own kernel, so the model hands attention
    /// to it (see [`crate::encoders::attention`]); Burn's ops otherwise.
    fn has_attention_kernel() -> bool {
        false
    }

    /// Whether this backend's kernels run on the host's cores. There a batch split into
    /// concurrent sub-batches keeps every core busy while one sub-batch sits in a narrow
    /// kernel; on a GPU the batch is one stream of kernels, and splitting it only makes each
    /// kernel smaller and multiplies the launches, so the trainer runs it whole.
    fn computes_on_host() -> bool {
        true
    }

    /// Attention over a fused qkv projection `[G, N, 3C]` with `bias` `[P, heads, N, N]`,
    /// heads merged: `[G, N, C]` (see [`crate::encoders::attention::attention`]).
    fn qkv_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::qkv_attention_with_probs(qkv, bias, heads, scale).0
    }

    /// [`Self::qkv_attention`] and its softmax probabilities `[G, heads, N, N]`, which the
    /// backward needs.
    fn qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, probs) =
            decomposed::attention_forward::<Self>(float(qkv), float(bias), heads, scale);
        (
            out.into_primitive().tensor(),
            probs.into_primitive().tensor(),
        )
    }

    /// Gradients of [`Self::qkv_attention`]: `(d_qkv, d_bias)`, `d_bias` with `bias_groups` rows.
    fn qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        bias_groups: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_qkv, d_bias) = decomposed::attention_backward::<Self>(
            float(qkv),
            float(probs),
            float(grad),
            bias_groups,
            scale,
        );
        (
            d_qkv.into_primitive().tensor(),
            d_bias.into_primitive().tensor(),
        )
    }

    /// One AdamW update of a flat parameter: `[value, first, second]`, each a new tensor
    /// (a checkpoint may still hold the old ones).
    fn adamw_update(
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: &AdamWUpdate,
    ) -> [FloatTensor<Self>; 3] {
        adamw_update_decomposed::<Self>(value, grad, moments, update)
    }

    /// `sum_i weights[i] * parts[i]` over same-shaped tensors, accumulated left to right in
    /// the tensors' precision: sub-batch gradients into the batch's, micro-steps into a step's.
    fn weighted_sum(parts: Vec<FloatTensor<Self>>, weights: &[f64]) -> Option<FloatTensor<Self>> {
        weighted_sum_decomposed::<Self>(parts, weights)
    }

    /// Lends a contiguous f32 tensor's device memory to `use_memory` as (device address,
    /// value count), for a library that reads and writes it in place (NCCL); `None` where the
    /// backend has no such memory (the CPU) or cannot lend it. The memory is valid, and the
    /// kernels that produced it have finished, for the duration of the call; values written
    /// there are what every other handle to the tensor reads afterwards.
    fn with_device_memory<R>(
        tensor: FloatTensor<Self>,
        use_memory: impl FnOnce(Option<(u64, usize)>) -> R,
    ) -> R {
        let _ = tensor;
        use_memory(None)
    }
}

#[cfg(feature = "ndarray")]
impl SimMimBackend for burn_ndarray::NdArray {}
