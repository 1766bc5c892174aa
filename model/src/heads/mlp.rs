//! The paper's 2-layer MLP head: 1x1 conv, GELU, 1x1 conv, pixel shuffle.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use super::linear::Pointwise;
use super::pixel_shuffle;
use crate::backend::SimMimBackend;
use crate::encoders::layers::gelu;
use crate::weights::init::WeightInit;

/// `nn.Sequential(Conv2d(features, hidden, 1), GELU(), Conv2d(hidden, stride^2 * out_chans, 1),
/// PixelShuffle(stride))`: `hidden` is `decoder.0`, `output` is `decoder.2`.
#[derive(Module, Debug)]
pub struct MlpHead<B: Backend> {
    pub hidden: Pointwise<B>,
    pub output: Pointwise<B>,
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
        Self {
            hidden: Pointwise::new(features, hidden, init, device),
            output: Pointwise::new(hidden, stride * stride * out_chans, init, device),
            stride,
            out_chans,
        }
    }

    pub fn forward(&self, tokens: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, count, dim] = tokens.dims();
        let hidden = gelu(self.hidden.forward(tokens.reshape([batch * count, dim])));
        pixel_shuffle(
            self.output.forward(hidden),
            batch,
            self.stride,
            self.out_chans,
        )
    }
}
