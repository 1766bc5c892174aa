//! The paper's 2-layer MLP head: 1x1 conv, GELU, 1x1 conv, pixel shuffle.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

use super::linear::pointwise;
use super::pixel_shuffle;
use crate::backend::SimMimBackend;
use crate::weights::init::WeightInit;

/// `nn.Sequential(Conv2d(features, hidden, 1), GELU(), Conv2d(hidden, stride^2 * out_chans, 1),
/// PixelShuffle(stride))`: `hidden_*` are `decoder.0.*`, `output_*` are `decoder.2.*`.
#[derive(Module, Debug)]
pub struct MlpHead<B: Backend> {
    pub hidden_weight: Param<Tensor<B, 4>>,
    pub hidden_bias: Param<Tensor<B, 1>>,
    pub output_weight: Param<Tensor<B, 4>>,
    pub output_bias: Param<Tensor<B, 1>>,
    stride: usize,
    out_chans: usize,
}

impl<B: SimMimBackend> MlpHead<B> {
    pub fn new(
        features: usize,
        hidden: usize,
        stride: usize,
        out_chans: usize,
        init: &mut WeightInit,
        device: &B::Device,
    ) -> Self {
        let out = stride * stride * out_chans;
        Self {
            hidden_weight: init.fan_in_uniform([hidden, features, 1, 1], features, device),
            hidden_bias: init.fan_in_uniform([hidden], features, device),
            output_weight: init.fan_in_uniform([out, hidden, 1, 1], hidden, device),
            output_bias: init.fan_in_uniform([out], hidden, device),
            stride,
            out_chans,
        }
    }

    pub fn forward(&self, tokens: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, count, dim] = tokens.dims();
        let side = (count as f64).sqrt().round() as usize;
        let rows = tokens.reshape([batch * count, dim]);
        let hidden = pointwise(&self.hidden_weight, &self.hidden_bias, rows);
        let hidden = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::gelu_exact(
            hidden.into_primitive().tensor(),
        )));
        let pixels = pointwise(&self.output_weight, &self.output_bias, hidden);
        pixel_shuffle(pixels, batch, side, self.stride, self.out_chans)
    }
}
