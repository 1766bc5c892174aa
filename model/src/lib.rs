//! SimMIM on Burn: Swin and ViT encoders, the mask token, the linear pixel-shuffle head and
//! the masked L1 loss, with weights under the official PyTorch names.
//!
//! One pretraining step:
//!
//! ```
//! use burn::backend::Autodiff;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_flex::Flex;
//! use simmim_model::{
//!     loss_and_grads, mask_tensor, AdamW, AdamWConfig, EncoderConfig, InitModel, SimMimConfig,
//! };
//!
//! # fn main() -> Result<(), simmim_model::ModelError> {
//! let mut config = SimMimConfig::preset("swin_micro").expect("preset");
//! if let EncoderConfig::Swin(swin) = &mut config.encoder {
//!     (swin.img_size, swin.depths, swin.num_heads) = (32, vec![2, 2], vec![3, 6]);
//! }
//! let device = Default::default();
//! let mut model = config.init::<Autodiff<Flex>>(42, &device)?;
//! let mut optimizer = AdamW::new(AdamWConfig::default());
//! let geometry = config.mask_geometry()?;
//! let masks: Vec<u8> = (0..2).flat_map(|sample| geometry.generate(sample)).collect();
//! let mask = mask_tensor(&masks, 2, geometry.token_grid(), &device);
//! let images = Tensor::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
//! let (loss, grads) = loss_and_grads(&model, images, mask, 2);
//! let (next, stats) = optimizer.step(1e-4, model, grads);
//! model = next;
//! assert!(loss > 0.0 && stats.grad_norm > 0.0);
//! # let _ = model;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod classifier;
pub mod config;
pub mod encoders;
pub mod error;
pub mod grads;
pub mod heads;
pub mod losses;
pub mod mask;
pub mod memory;
pub mod optim;
pub mod recompute;
pub mod simmim;
pub mod step;
pub mod weights;

pub use backend::SimMimBackend;
pub use classifier::{Classifier, InitClassifier};
pub use config::{EncoderConfig, SimMimConfig, SwinConfig, VitConfig};
pub use encoders::Encoder;
pub use error::ModelError;
pub use mask::MaskGeometry;
pub use optim::{AdamW, AdamWConfig};
pub use simmim::{mask_tensor, InitModel, SimMim, SimMimOutput};
pub use step::loss_and_grads;
