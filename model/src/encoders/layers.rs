//! Building blocks shared by the Swin and ViT encoders and the SimMIM head.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Distribution, Int, Tensor, TensorData, TensorPrimitive};

use crate::backend::SimMimBackend;

use crate::backend::precision::matmul;
use crate::weights::init::{constant, WeightInit};

/// `nn.Linear` initialised as the official code does (trunc-normal 0.02, zero bias).
pub fn linear<B: Backend>(
    init: &mut WeightInit,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Linear<B> {
    let mut layer = LinearConfig::new(d_in, d_out).with_bias(bias).init(device);
    layer.weight = init.trunc_normal([d_in, d_out], 0.02, device);
    if bias {
        layer.bias = Some(constant([d_out], 0.0, device));
    }
    layer
}

pub fn layer_norm<B: Backend>(dim: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNorm {
        gamma: constant([dim], 1.0, device),
        beta: constant([dim], 0.0, device),
        epsilon: eps,
    }
}

/// `nn.LayerNorm(dim, eps)` with its affine parameters, run through the backend's fused
/// LayerNorm op (and its one-pass backward). Burn's own LayerNorm keeps epsilon private and
/// is differentiated through its decomposition. The parameter names match Burn's (`gamma`,
/// `beta`) so the naming layer maps both the same way.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    pub(crate) epsilon: f64,
}

impl<B: SimMimBackend> LayerNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm_affine(
            x.into_primitive().tensor(),
            self.gamma.val().into_primitive().tensor(),
            self.beta.val().into_primitive().tensor(),
            self.epsilon,
        )))
    }
}

/// A convolution with kernel = stride = `patch` (the patch embedding), computed as one
/// matmul over non-overlapping patches; the weight keeps PyTorch's `[out, in, p, p]` layout.
#[derive(Module, Debug)]
pub struct PatchProjection<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> PatchProjection<B> {
    /// `[B, C, H, W]` to `[B, (H/p)*(W/p), out]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let [out, in_chans, patch, _] = self.weight.dims();
        let [batch, channels, height, width] = images.dims();
        debug_assert_eq!(channels, in_chans);
        let (rows, cols) = (height / patch, width / patch);
        let patches = images
            .reshape([batch, channels, rows, patch, cols, patch])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([batch * rows * cols, channels * patch * patch]);
        let kernel = self
            .weight
            .val()
            .reshape([out, in_chans * patch * patch])
            .transpose();
        (matmul(patches, kernel) + self.bias.val().unsqueeze_dim(0)).reshape([
            batch,
            rows * cols,
            out,
        ])
    }
}

/// Conv patch embedding with an optional LayerNorm (Swin's `patch_norm`).
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: PatchProjection<B>,
    pub norm: Option<LayerNorm<B>>,
}

impl<B: SimMimBackend> PatchEmbed<B> {
    pub fn new(
        init: &mut WeightInit,
        in_chans: usize,
        patch: usize,
        dim: usize,
        norm: bool,
        device: &B::Device,
    ) -> Self {
        let fan_in = in_chans * patch * patch;
        Self {
            proj: PatchProjection {
                weight: init.fan_in_uniform([dim, in_chans, patch, patch], fan_in, device),
                bias: init.fan_in_uniform([dim], fan_in, device),
            },
            norm: norm.then(|| layer_norm(dim, 1e-5, device)),
        }
    }

    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let tokens = self.proj.forward(images);
        match &self.norm {
            Some(norm) => norm.forward(tokens),
            None => tokens,
        }
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: SimMimBackend> Mlp<B> {
    pub fn new(init: &mut WeightInit, dim: usize, ratio: f64, device: &B::Device) -> Self {
        let hidden = (dim as f64 * ratio) as usize;
        Self {
            fc1: linear(init, dim, hidden, true, device),
            fc2: linear(init, hidden, dim, true, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let hidden = linear_rows(&self.fc1, x.reshape([batch * tokens, dim]));
        linear_rows(&self.fc2, gelu(hidden)).reshape([batch, tokens, dim])
    }
}

/// A linear layer over a token sequence `[B, L, C]`, run as one `[B*L, C]` matmul: Burn's
/// rank-3 linear broadcasts the weight into B small matmuls (and B weight-gradient matmuls
/// summed afterwards), several times slower on the CPU backend.
pub fn linear_tokens<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, tokens, dim] = x.dims();
    let out = linear_rows(layer, x.reshape([batch * tokens, dim]));
    let width = out.dims()[1];
    out.reshape([batch, tokens, width])
}

/// `nn.Linear` over rows `[N, in]`, its matmul in the current precision
/// ([`crate::backend::precision`]).
pub fn linear_rows<B: Backend>(layer: &Linear<B>, rows: Tensor<B, 2>) -> Tensor<B, 2> {
    let out = matmul(rows, layer.weight.val());
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze_dim(0),
        None => out,
    }
}

/// One of the q/k/v projections of a fused `qkv` linear (`part` 0, 1 or 2), as per-head
/// `[B, heads, N, head_dim]`, multiplied by `scale`. Multiplying by a column slice of the
/// fused weight gives each part contiguous (slicing a fused `[.., 3C]` output instead costs
/// a zero-filled scatter per part in backward), and scaling the `[C, C]` weight slice is far
/// cheaper than scaling q or the attention logits.
pub fn qkv_part<B: Backend>(
    weight: &Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    rows: &Tensor<B, 2>,
    part: usize,
    scale: f64,
    shape: [usize; 3],
) -> Tensor<B, 4> {
    let [batch, tokens, heads] = shape;
    let dim = weight.dims()[1] / 3;
    let mut kernel = weight.clone().narrow(1, part * dim, dim);
    let mut bias = bias;
    if scale != 1.0 {
        kernel = kernel.mul_scalar(scale);
        bias = bias.map(|b| b.mul_scalar(scale));
    }
    let mut projected = matmul(rows.clone(), kernel);
    if let Some(bias) = bias {
        projected = projected + bias.unsqueeze_dim(0);
    }
    projected
        .reshape([batch, tokens, heads, dim / heads])
        .swap_dims(1, 2)
}

/// Exact (erf) GELU, as `torch.nn.GELU()`, through the backend's kernel and backward.
pub fn gelu<B: SimMimBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::gelu_exact(
        x.into_primitive().tensor(),
    )))
}

/// Softmax over the last dimension through the backend's fused op and backward.
pub fn softmax_last<B: SimMimBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::softmax_last(
        x.into_primitive().tensor(),
    )))
}

/// A block's two drop-path draws (attention branch, MLP branch), each `[B, 1, 1]` and already
/// divided by the keep probability. Drawn once per block and pass, so a block computed again
/// in the backward pass (activation checkpointing) drops the same samples.
pub type DropKeep<B> = [Tensor<B, 3>; 2];

/// The drop-path draws of a block at `rate` for `batch` samples; `None` at rate 0.
pub fn draw_keep<B: Backend>(rate: f64, batch: usize, device: &B::Device) -> Option<DropKeep<B>> {
    if rate <= 0.0 {
        return None;
    }
    let keep = 1.0 - rate;
    let draw = || {
        Tensor::<B, 3>::random([batch, 1, 1], Distribution::Bernoulli(keep), device)
            .div_scalar(keep)
    };
    Some([draw(), draw()])
}

/// A block's draws for a forward pass that trains (gradients tracked, as `timm.DropPath` in
/// train mode); `None` in inference.
pub fn training_keep<B: Backend>(
    rate: f64,
    batch: usize,
    device: &B::Device,
) -> Option<DropKeep<B>> {
    if B::ad_enabled(device) {
        draw_keep(rate, batch, device)
    } else {
        None
    }
}

/// A residual branch scaled by its drop-path draw, if any.
pub fn kept<B: Backend>(branch: Tensor<B, 3>, keep: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
    match keep {
        Some(keep) => branch * keep.clone(),
        None => branch,
    }
}

/// Linearly increasing drop-path rates over `depth` blocks, as `torch.linspace(0, rate, depth)`.
pub fn drop_path_schedule(rate: f64, depth: usize) -> Vec<f64> {
    if depth <= 1 {
        return vec![0.0; depth];
    }
    (0..depth)
        .map(|i| rate * i as f64 / (depth - 1) as f64)
        .collect()
}

/// Looks up a relative position bias table `[rows, heads]` with a flat index `[N*N]`, giving
/// the per-head bias `[heads, N, N]`.
pub fn relative_bias<B: Backend>(
    table: Tensor<B, 2>,
    index: Tensor<B, 1, Int>,
    tokens: usize,
) -> Tensor<B, 3> {
    let heads = table.dims()[1];
    table
        .select(0, index)
        .reshape([tokens, tokens, heads])
        .permute([2, 0, 1])
}

pub fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}
