//! The encoders SimMIM pretrains: Swin (windowed attention, patch merging) and ViT, each
//! taking a mask that swaps masked patch embeddings for the learnable mask token.

pub mod attention;
pub mod layers;
pub mod rel_pos;
pub mod swin;
pub mod vit;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::backend::SimMimBackend;
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
