//! Burn's own ops for what the backends may fuse: the trait's defaults, and the fallback of
//! a kernel for inputs it does not take (another dtype, a strided view). They are the
//! reference the kernels are tested against.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{activation, Scalar, Tensor, TensorMetadata, TensorPrimitive};

use super::precision;

/// Burn's ops for [`super::SimMimBackend::weighted_sum`]; `None` without parts.
pub(crate) fn weighted_sum_decomposed<B: Backend>(
    parts: Vec<FloatTensor<B>>,
    weights: &[f64],
) -> Option<FloatTensor<B>> {
    parts
        .into_iter()
        .zip(weights)
        .map(|(part, &w)| {
            let w = Scalar::new(w, &part.dtype());
            B::float_mul_scalar(part, w)
        })
        .reduce(B::float_add)
}

/// Softmax backward from Burn tensor ops (for inputs the CPU kernel does not take).
pub(crate) fn softmax_backward_decomposed<B: Backend>(
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = y.shape();
    let width = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / width;
    let matrix = |t: FloatTensor<B>| {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).reshape([rows, width])
    };
    let (y, grad) = (matrix(y), matrix(grad));
    let dot = (grad.clone() * y.clone()).sum_dim(1);
    B::float_reshape((y * (grad - dot)).into_primitive().tensor(), shape)
}

/// LayerNorm backward from Burn tensor ops: the default for backends without a kernel.
pub(crate) fn layer_norm_backward_decomposed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> [FloatTensor<B>; 3] {
    let shape = x.shape();
    let width = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / width;
    let matrix = |t: FloatTensor<B>| {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).reshape([rows, width])
    };
    let (x, grad) = (matrix(x), matrix(grad));
    let gamma = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(gamma));
    let centered = x.clone() - x.mean_dim(1);
    let rstd = centered
        .clone()
        .square()
        .mean_dim(1)
        .add_scalar(epsilon)
        .sqrt()
        .recip();
    let normalized = centered * rstd.clone();
    let d_normalized = grad.clone() * gamma.unsqueeze_dim(0);
    let mean_d = d_normalized.clone().mean_dim(1);
    let mean_d_dot = (d_normalized.clone() * normalized.clone()).mean_dim(1);
    let dx = (d_normalized - mean_d - normalized.clone() * mean_d_dot) * rstd;
    let dgamma = (grad.clone() * normalized).sum_dim(0).reshape([width]);
    let dbeta = grad.sum_dim(0).reshape([width]);
    [
        B::float_reshape(dx.into_primitive().tensor(), shape),
        dgamma.into_primitive().tensor(),
        dbeta.into_primitive().tensor(),
    ]
}

/// q, k or v (`part` 0, 1, 2) of `qkv` `[G, N, 3C]` as `[G, heads, N, C / heads]`.
fn split_part<B: Backend>(qkv: &Tensor<B, 3>, part: usize, heads: usize) -> Tensor<B, 4> {
    let [groups, tokens, width] = qkv.dims();
    let dim = width / 3;
    qkv.clone()
        .narrow(2, part * dim, dim)
        .reshape([groups, tokens, heads, dim / heads])
        .swap_dims(1, 2)
}

/// `[G, heads, N, head_dim]` back to `[G, N, C]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [groups, heads, tokens, head_dim] = x.dims();
    x.swap_dims(1, 2)
        .reshape([groups, tokens, heads * head_dim])
}

/// The forward in Burn ops: `(output [G, N, C], probabilities [G, heads, N, N])`. Matmuls run
/// in the current precision.
pub fn attention_forward<B: Backend>(
    qkv: Tensor<B, 3>,
    bias: Tensor<B, 4>,
    heads: usize,
    scale: f64,
) -> (Tensor<B, 3>, Tensor<B, 4>) {
    let [groups, tokens, _] = qkv.dims();
    let bias_groups = bias.dims()[0];
    let q = split_part(&qkv, 0, heads).mul_scalar(scale);
    let (k, v) = (split_part(&qkv, 1, heads), split_part(&qkv, 2, heads));
    let logits = precision::matmul(q, k.swap_dims(2, 3)).reshape([
        groups / bias_groups,
        bias_groups,
        heads,
        tokens,
        tokens,
    ]) + bias.unsqueeze_dim(0);
    let probs = activation::softmax(logits.reshape([groups, heads, tokens, tokens]), 3);
    let out = merge_heads(precision::matmul(probs.clone(), v));
    (out, probs)
}

/// The backward in Burn ops, from the forward's probabilities: `(d_qkv [G, N, 3C],
/// d_bias [P, heads, N, N])`.
pub fn attention_backward<B: Backend>(
    qkv: Tensor<B, 3>,
    probs: Tensor<B, 4>,
    grad: Tensor<B, 3>,
    bias_groups: usize,
    scale: f64,
) -> (Tensor<B, 3>, Tensor<B, 4>) {
    let [groups, heads, tokens, _] = probs.dims();
    let (q, k, v) = (
        split_part(&qkv, 0, heads),
        split_part(&qkv, 1, heads),
        split_part(&qkv, 2, heads),
    );
    let dim = qkv.dims()[2] / 3;
    let d_out = grad
        .reshape([groups, tokens, heads, dim / heads])
        .swap_dims(1, 2);
    let d_v = precision::matmul(probs.clone().swap_dims(2, 3), d_out.clone());
    let d_probs = precision::matmul(d_out, v.swap_dims(2, 3));
    let row_dot = (d_probs.clone() * probs.clone()).sum_dim(3);
    let d_logits = probs * (d_probs - row_dot);
    let d_q = precision::matmul(d_logits.clone(), k).mul_scalar(scale);
    let d_k = precision::matmul(d_logits.clone().swap_dims(2, 3), q).mul_scalar(scale);
    let d_bias = d_logits
        .reshape([groups / bias_groups, bias_groups, heads, tokens, tokens])
        .sum_dim(0)
        .reshape([bias_groups, heads, tokens, tokens]);
    let d_qkv = Tensor::cat(
        vec![merge_heads(d_q), merge_heads(d_k), merge_heads(d_v)],
        2,
    );
    (d_qkv, d_bias)
}

/// The numbers of one AdamW update of one parameter, as `torch.optim.AdamW` applies them:
/// `g = grad * grad_scale`, `m = beta1 m + (1 - beta1) g`, `v = beta2 v + (1 - beta2) g²`,
/// `value = value * decay_factor - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWUpdate {
    /// The global-norm clipping factor (1 without clipping).
    pub grad_scale: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// `1 - lr * weight_decay` for the decay group, else 1.
    pub decay_factor: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
}

/// [`AdamWUpdate`] in Burn ops on flat tensors: `[value, first, second]` (moments start at
/// zero when `moments` is `None`). The default for backends without their own kernel.
pub fn adamw_update_decomposed<B: Backend>(
    value: FloatTensor<B>,
    grad: FloatTensor<B>,
    moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
    u: &AdamWUpdate,
) -> [FloatTensor<B>; 3] {
    let flat = super::float::<B, 1>;
    let mut grad = flat(grad);
    if u.grad_scale != 1.0 {
        grad = grad.mul_scalar(u.grad_scale);
    }
    let (first, second) = match moments {
        Some((first, second)) => (
            flat(first).mul_scalar(u.beta1) + grad.clone().mul_scalar(1.0 - u.beta1),
            flat(second).mul_scalar(u.beta2) + grad.square().mul_scalar(1.0 - u.beta2),
        ),
        None => (
            grad.clone().mul_scalar(1.0 - u.beta1),
            grad.square().mul_scalar(1.0 - u.beta2),
        ),
    };
    let mut value = flat(value);
    if u.decay_factor != 1.0 {
        value = value.mul_scalar(u.decay_factor);
    }
    let denominator = second
        .clone()
        .sqrt()
        .div_scalar(u.bias_correction2_sqrt)
        .add_scalar(u.eps);
    value = value - (first.clone() / denominator).mul_scalar(u.step_size);
    [value, first, second].map(|t| t.into_primitive().tensor())
}
