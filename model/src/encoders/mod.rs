//! The encoders SimMIM pretrains: Swin v1 and v2 (windowed attention, patch merging) and ViT,
//! each taking a mask that swaps masked patch embeddings for the learnable mask token.
//!
//! Besides `forward`, an encoder is a chain of segments for activation checkpointing
//! (`crate::recompute`): the stem (embedding and masking), one segment per Transformer block
//! (a Swin stage's last block also merges patches) and the final norm.

pub mod attention;
pub mod layers;
pub mod rel_pos;
pub mod swin;
pub mod vit;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::backend::SimMimBackend;
use layers::DropKeep;
use swin::Swin;
use vit::Vit;

// One model holds one encoder for its whole life; boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Encoder<B: Backend> {
    Swin(Swin<B>),
    Vit(Vit<B>),
}

impl<B: SimMimBackend> Encoder<B> {
    pub fn forward(&self, images: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        match self {
            Self::Swin(swin) => swin.forward(images, mask),
            Self::Vit(vit) => vit.forward(images, mask),
        }
    }
}

impl<B: SimMimBackend> Encoder<B> {
    pub(crate) fn stem(&self, images: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        match self {
            Self::Swin(swin) => swin.stem(images, mask),
            Self::Vit(vit) => vit.stem(images, mask),
        }
    }

    pub(crate) fn block_count(&self) -> usize {
        match self {
            Self::Swin(swin) => swin.block_count(),
            Self::Vit(vit) => vit.blocks.len(),
        }
    }

    pub(crate) fn block(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        keep: Option<&DropKeep<B>>,
    ) -> Tensor<B, 3> {
        match self {
            Self::Swin(swin) => swin.block(index, x, keep),
            Self::Vit(vit) => vit.block(index, x, keep),
        }
    }

    /// Block `index`'s drop-path draws for one pass (`None` at rate 0).
    pub(crate) fn draw_keep(
        &self,
        index: usize,
        batch: usize,
        device: &B::Device,
    ) -> Option<DropKeep<B>> {
        match self {
            Self::Swin(swin) => swin.draw_keep(index, batch, device),
            Self::Vit(vit) => vit.draw_keep(index, batch, device),
        }
    }

    pub(crate) fn finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Swin(swin) => swin.finish(x),
            Self::Vit(vit) => vit.finish(x),
        }
    }
}
