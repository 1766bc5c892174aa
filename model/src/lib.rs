//! SimMIM on Burn: Swin and ViT encoders, the mask token, the linear pixel-shuffle head and
//! the masked L1 loss, with weights under the official PyTorch names.

pub mod backend;
pub mod config;
pub mod error;
pub mod init;
pub mod layers;
pub mod mask;
pub mod naming;
pub mod optim;
pub mod rel_pos;
pub mod simmim;
pub mod step;
pub mod swin;
pub mod vit;
pub mod weights;

pub use backend::SimMimBackend;
pub use config::{EncoderConfig, SimMimConfig, SwinConfig, VitConfig};
pub use error::ModelError;
pub use mask::MaskGeometry;
pub use optim::{AdamW, AdamWConfig};
pub use simmim::{mask_tensor, Encoder, SimMim, SimMimOutput};
pub use step::loss_and_grads;
