//! The prediction heads: encoder features `[B, tokens, C]` on a square grid to pixels
//! `[B, 3, grid * stride, grid * stride]`. The paper compares them at one encoder: the
//! linear head (its default) against heavier ones that cost step time and do not help.

mod linear;
mod mlp;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::backend::SimMimBackend;
use crate::config::{HeadKind, HeadSpec};
use crate::weights::init::WeightInit;
pub use linear::PixelShuffleHead;
pub use mlp::MlpHead;

// One model holds one head for its whole life; boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Head<B: Backend> {
    Linear(PixelShuffleHead<B>),
    Mlp(MlpHead<B>),
}

impl<B: SimMimBackend> Head<B> {
    /// The head `spec` asks for over `features` channels, predicting `stride` x `stride`
    /// pixels of `out_chans` channels per token, with PyTorch's default conv initialisation.
    pub fn new(
        spec: &HeadSpec,
        features: usize,
        stride: usize,
        out_chans: usize,
        init: &mut WeightInit,
        device: &B::Device,
    ) -> Self {
        match spec.kind {
            HeadKind::Linear => Self::Linear(PixelShuffleHead::new(
                features, stride, out_chans, init, device,
            )),
            HeadKind::Mlp => Self::Mlp(MlpHead::new(
                features,
                spec.hidden.unwrap_or(features),
                stride,
                out_chans,
                init,
                device,
            )),
        }
    }

    /// Tokens `[B, h*w, C]` on a square grid to an image `[B, out_chans, h*stride, w*stride]`.
    pub fn forward(&self, tokens: Tensor<B, 3>) -> Tensor<B, 4> {
        match self {
            Self::Linear(head) => head.forward(tokens),
            Self::Mlp(head) => head.forward(tokens),
        }
    }
}

/// `[B*h*w, stride^2 * c]` per-token pixels to the image `[B, c, h*stride, w*stride]`, as
/// `nn.PixelShuffle(stride)` orders them (channel-major, then the row and column offsets).
pub(crate) fn pixel_shuffle<B: Backend>(
    pixels: Tensor<B, 2>,
    batch: usize,
    side: usize,
    stride: usize,
    channels: usize,
) -> Tensor<B, 4> {
    let r = stride;
    pixels
        .reshape([batch, side, side, channels, r, r])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([batch, channels, side * r, side * r])
}
