//! The paper's inverse Swin head: a decoder symmetric to the Swin encoder. Where the encoder
//! merges 2x2 patches, the decoder expands each token to 2x2 (Swin-Unet's patch expanding),
//! then runs Swin blocks of that stage's geometry; a LayerNorm and the linear head end it at
//! the patch grid. The paper's point: it costs several times the linear head (inverse Swin-B
//! 2.3x the step) for no better representation.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use super::PixelShuffleHead;
use crate::backend::SimMimBackend;
use crate::config::SwinConfig;
use crate::encoders::layers::{layer_norm, linear, linear_tokens, LayerNorm};
use crate::encoders::swin::{stage_blocks, SwinBlock, SwinVersion};
use crate::weights::init::WeightInit;

/// `Linear(dim, 2 dim, bias=False)`, each token's output read as a 2x2 block of `dim / 2`
/// channels (`b h w (p1 p2 c) -> b (h p1) (w p2) c`), then `LayerNorm(dim / 2)`.
#[derive(Module, Debug)]
pub struct PatchExpand<B: Backend> {
    pub expand: Linear<B>,
    pub norm: LayerNorm<B>,
    resolution: usize,
}

impl<B: SimMimBackend> PatchExpand<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let r = self.resolution;
        let expanded = linear_tokens(&self.expand, x)
            .reshape([batch, r, r, 2, 2, dim / 2])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([batch, 4 * tokens, dim / 2]);
        self.norm.forward(expanded)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub upsample: PatchExpand<B>,
    pub blocks: Vec<SwinBlock<B>>,
}

#[derive(Module, Debug)]
pub struct InverseSwinHead<B: Backend> {
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: LayerNorm<B>,
    pub head: PixelShuffleHead<B>,
}

impl<B: SimMimBackend> InverseSwinHead<B> {
    /// `depths`: blocks per decoder stage, deepest first (`SimMimConfig::inverse_swin_decoder`).
    pub fn new(
        c: &SwinConfig,
        depths: &[usize],
        stride: usize,
        init: &mut WeightInit,
        device: &B::Device,
    ) -> Self {
        let stages = c.depths.len();
        let layers = (0..stages.saturating_sub(1))
            .rev()
            .zip(depths)
            .map(|(stage, &depth)| {
                let wide = c.stage_dim(stage + 1);
                DecoderLayer {
                    upsample: PatchExpand {
                        expand: linear(init, wide, 2 * wide, false, device),
                        norm: layer_norm(wide / 2, 1e-5, device),
                        resolution: c.stage_resolution(stage + 1),
                    },
                    // Swin-Unet's decoder: v1 blocks, whichever Swin the encoder is.
                    blocks: stage_blocks(
                        init,
                        SwinVersion::V1,
                        c,
                        stage,
                        depth,
                        &mut std::iter::empty(),
                        device,
                    ),
                }
            })
            .collect();
        Self {
            layers,
            norm: layer_norm(c.embed_dim, 1e-5, device),
            head: PixelShuffleHead::new(c.embed_dim, stride, c.in_chans, init, device),
        }
    }

    /// The encoder's last-stage tokens `[B, L, C]` to pixels at the patch grid times `stride`.
    pub fn forward(&self, tokens: Tensor<B, 3>) -> Tensor<B, 4> {
        let mut x = tokens;
        for layer in &self.layers {
            x = layer.upsample.forward(x);
            for block in &layer.blocks {
                x = block.forward(x);
            }
        }
        self.head.forward(self.norm.forward(x))
    }
}
