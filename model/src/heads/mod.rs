//! The prediction heads: encoder features `[B, tokens, C]` on a square grid to pixels
//! `[B, 3, grid * stride, grid * stride]`. The paper compares them at one encoder: the
//! linear head (its default) against heavier ones that cost step time and do not help.

mod inverse_swin;
mod linear;
mod mlp;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::backend::SimMimBackend;
use crate::config::{HeadKind, SimMimConfig};
use crate::error::ModelError;
use crate::weights::init::WeightInit;
pub use inverse_swin::InverseSwinHead;
pub use linear::PixelShuffleHead;
pub use mlp::MlpHead;

// One model holds one head for its whole life; boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Head<B: Backend> {
    Linear(PixelShuffleHead<B>),
    Mlp(MlpHead<B>),
    InverseSwin(InverseSwinHead<B>),
}

impl<B: SimMimBackend> Head<B> {
    /// The head `config.head` asks for, predicting `stride` x `stride` pixels of the input's
    /// channels per token of its last grid, with PyTorch's default initialisation.
    pub fn new(
        config: &SimMimConfig,
        stride: usize,
        init: &mut WeightInit,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let spec = &config.head;
        let features = config.encoder.num_features();
        let out_chans = config.encoder.in_chans();
        Ok(match spec.kind {
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
            HeadKind::InverseSwin => {
                let (swin, depths) = config.inverse_swin_decoder()?;
                Self::InverseSwin(InverseSwinHead::new(swin, &depths, stride, init, device))
            }
        })
    }

    /// Tokens `[B, h*w, C]` on a square grid to an image `[B, out_chans, h*stride, w*stride]`.
    pub fn forward(&self, tokens: Tensor<B, 3>) -> Tensor<B, 4> {
        match self {
            Self::Linear(head) => head.forward(tokens),
            Self::Mlp(head) => head.forward(tokens),
            Self::InverseSwin(head) => head.forward(tokens),
        }
    }
}

/// `[B*h*w, stride^2 * c]` per-token pixels on a square `h = w` grid to the image
/// `[B, c, h*stride, w*stride]`, as `nn.PixelShuffle(stride)` orders them (channel-major, then
/// the row and column offsets).
pub(crate) fn pixel_shuffle<B: Backend>(
    pixels: Tensor<B, 2>,
    batch: usize,
    stride: usize,
    channels: usize,
) -> Tensor<B, 4> {
    let tokens = pixels.dims()[0] / batch.max(1);
    let side = (tokens as f64).sqrt().round() as usize;
    let r = stride;
    pixels
        .reshape([batch, side, side, channels, r, r])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([batch, channels, side * r, side * r])
}
