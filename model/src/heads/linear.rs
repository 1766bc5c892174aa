//! The paper's default head: one linear layer (a 1x1 conv) and a pixel shuffle.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::pixel_shuffle;
use crate::backend::precision::matmul;
use crate::backend::SimMimBackend;
use crate::weights::init::WeightInit;

/// `Conv2d(features, stride^2 * out_chans, 1)` + `PixelShuffle(stride)`, applied straight to
/// the token sequence (a 1x1 conv is a per-token linear map), weight in PyTorch's conv layout.
#[derive(Module, Debug)]
pub struct PixelShuffleHead<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
    stride: usize,
    out_chans: usize,
}

impl<B: SimMimBackend> PixelShuffleHead<B> {
    pub fn new(
        features: usize,
        stride: usize,
        out_chans: usize,
        init: &mut WeightInit,
        device: &B::Device,
    ) -> Self {
        let Pointwise { weight, bias } =
            Pointwise::new(features, stride * stride * out_chans, init, device);
        Self {
            weight,
            bias,
            stride,
            out_chans,
        }
    }

    /// Tokens `[B, h*w, C]` on a square grid to an image `[B, out_chans, h*stride, w*stride]`.
    pub fn forward(&self, tokens: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, count, dim] = tokens.dims();
        let pixels = conv1x1(
            &self.weight,
            &self.bias,
            tokens.reshape([batch * count, dim]),
        );
        pixel_shuffle(pixels, batch, self.stride, self.out_chans)
    }
}

/// `Conv2d(inputs, outputs, 1)` over token rows, with PyTorch's default initialisation.
#[derive(Module, Debug)]
pub struct Pointwise<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: SimMimBackend> Pointwise<B> {
    pub fn new(inputs: usize, outputs: usize, init: &mut WeightInit, device: &B::Device) -> Self {
        Self {
            weight: init.fan_in_uniform([outputs, inputs, 1, 1], inputs, device),
            bias: init.fan_in_uniform([outputs], inputs, device),
        }
    }

    /// Rows `[N, inputs]` to `[N, outputs]`.
    pub fn forward(&self, rows: Tensor<B, 2>) -> Tensor<B, 2> {
        conv1x1(&self.weight, &self.bias, rows)
    }
}

/// A 1x1 conv over rows `[N, in]`: `rows @ weight[out, in]^T + bias`, in the current precision.
fn conv1x1<B: SimMimBackend>(
    weight: &Param<Tensor<B, 4>>,
    bias: &Param<Tensor<B, 1>>,
    rows: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [out, input, ..] = weight.dims();
    let kernel = weight.val().reshape([out, input]).transpose();
    matmul(rows, kernel) + bias.val().unsqueeze_dim(0)
}
