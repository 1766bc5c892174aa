//! The SimMIM wrapper: encoder with a mask token, a one-layer linear head (1x1 conv + pixel
//! shuffle) and the masked L1 loss, as `SimMIM` in the official `simmim.py`.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::backend::SimMimBackend;
use crate::config::{EncoderConfig, LossSpec, SimMimConfig};
use crate::encoders::swin::{Swin, SwinVersion};
use crate::encoders::vit::Vit;
use crate::encoders::Encoder;
use crate::error::ModelError;
use crate::heads::Head;
use crate::losses::reconstruction_loss;
use crate::weights::init::WeightInit;

#[derive(Module, Debug)]
pub struct SimMim<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Head<B>,
    patch_size: usize,
    in_chans: usize,
    #[module(skip)]
    loss: LossSpec,
}

/// What a forward pass gives: the scalar loss (`[1]`) and the reconstruction `[B, C, H, W]`.
#[derive(Debug, Clone)]
pub struct SimMimOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub reconstruction: Tensor<B, 4>,
}

/// Building a model from its config. A trait because the config type lives in `simmim-proto`,
/// which must not depend on Burn.
pub trait InitModel {
    /// Builds the model with the official initialisation, drawn from `seed` on the host so
    /// every process that builds with the same seed holds the same weights.
    fn init<B: SimMimBackend>(
        &self,
        seed: u64,
        device: &B::Device,
    ) -> Result<SimMim<B>, ModelError>;
}

impl InitModel for SimMimConfig {
    fn init<B: SimMimBackend>(
        &self,
        seed: u64,
        device: &B::Device,
    ) -> Result<SimMim<B>, ModelError> {
        self.validate()?;
        let mut init = WeightInit::new(seed);
        let encoder = match &self.encoder {
            EncoderConfig::Swin(c) => {
                Encoder::Swin(Swin::new(c, SwinVersion::V1, &mut init, device))
            }
            EncoderConfig::Swinv2(c) => {
                Encoder::Swin(Swin::new(c, SwinVersion::V2, &mut init, device))
            }
            EncoderConfig::Vit(c) => Encoder::Vit(Vit::new(c, &mut init, device)),
        };
        let (_, stride) = self.target_geometry()?;
        let in_chans = self.encoder.in_chans();
        Ok(SimMim {
            encoder,
            decoder: Head::new(self, stride, &mut init, device)?,
            patch_size: self.encoder.patch_size(),
            in_chans,
            loss: self.loss,
        })
    }
}

impl<B: SimMimBackend> SimMim<B> {
    /// `images` `[B, C, H, W]` (normalised), `mask` `[B, H/patch, W/patch]` with 1 = masked.
    pub fn forward(&self, images: Tensor<B, 4>, mask: Tensor<B, 3>) -> SimMimOutput<B> {
        let [batch, rows, cols] = mask.dims();
        let features = self.encoder.forward(
            images.clone(),
            Some(mask.clone().reshape([batch, rows * cols])),
        );
        let reconstruction = self.decoder.forward(features);
        let loss = self.loss_of(images, reconstruction.clone(), mask);
        SimMimOutput {
            loss,
            reconstruction,
        }
    }

    /// From the last encoder block's output on: the final norm, the head and the loss
    /// (the part of the pass activation checkpointing does not split).
    pub(crate) fn tail(
        &self,
        blocks_out: Tensor<B, 3>,
        images: Tensor<B, 4>,
        mask: Tensor<B, 3>,
    ) -> (Tensor<B, 1>, Tensor<B, 4>) {
        let reconstruction = self.decoder.forward(self.encoder.finish(blocks_out));
        (
            self.loss_of(images, reconstruction.clone(), mask),
            reconstruction,
        )
    }

    fn loss_of(
        &self,
        images: Tensor<B, 4>,
        reconstruction: Tensor<B, 4>,
        mask: Tensor<B, 3>,
    ) -> Tensor<B, 1> {
        reconstruction_loss(
            &self.loss,
            self.patch_size,
            self.in_chans,
            images,
            reconstruction,
            mask,
        )
    }

    /// The reconstruction at the input's size, for pictures: a coarser target (see
    /// `loss.target_resolution`) has each predicted pixel repeated over the block it averages.
    pub fn at_input_size(&self, reconstruction: Tensor<B, 4>, side: usize) -> Tensor<B, 4> {
        let [batch, channels, height, width] = reconstruction.dims();
        if height == side || height == 0 || !side.is_multiple_of(height) {
            return reconstruction;
        }
        let factor = side / height;
        reconstruction
            .reshape([batch, channels, height, 1, width, 1])
            .repeat_dim(3, factor)
            .repeat_dim(5, factor)
            .reshape([batch, channels, height * factor, width * factor])
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }
}

/// Token masks (`u8`, 1 = masked, `[B, side, side]` row-major) as a float tensor.
pub fn mask_tensor<B: Backend>(
    masks: &[u8],
    batch: usize,
    side: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let values: Vec<f32> = masks.iter().map(|&m| m as f32).collect();
    Tensor::from_data(TensorData::new(values, [batch, side, side]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EncoderConfig, LossArea, LossKind};
    use burn::backend::Autodiff;
    use burn_flex::Flex;

    fn loss<B: SimMimBackend>(config: &SimMimConfig) -> Vec<f32> {
        let device = Default::default();
        let model = config.init::<B>(3, &device).expect("init");
        let geometry = config.mask_geometry().expect("geometry");
        let side = geometry.token_grid();
        let masks: Vec<u8> = (0..2).flat_map(|i| geometry.generate(i)).collect();
        let img = config.encoder.img_size();
        let values: Vec<f32> = (0..2 * 3 * img * img)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let images = Tensor::<B, 4>::from_data(TensorData::new(values, [2, 3, img, img]), &device);
        (0..2)
            .map(|_| {
                model
                    .forward(images.clone(), mask_tensor(&masks, 2, side, &device))
                    .loss
                    .into_scalar()
                    .elem()
            })
            .collect()
    }

    use burn::tensor::ElementConversion;

    /// The loss of one forward pass, and the same loss computed on the host in f64 from the
    /// images, the mask and the reconstruction the pass returned.
    fn loss_and_host_loss(spec: LossSpec) -> (f64, f64) {
        let mut config = SimMimConfig::preset("swin_micro").expect("preset");
        if let EncoderConfig::Swin(c) = &mut config.encoder {
            (c.img_size, c.depths, c.num_heads) = (32, vec![2, 2], vec![3, 6]);
        }
        config.loss = spec;
        let device = Default::default();
        let model = config.init::<Flex>(5, &device).expect("init");
        let geometry = config.mask_geometry().expect("geometry");
        let grid = geometry.token_grid();
        let masks: Vec<u8> = (0..2).flat_map(|i| geometry.generate(i)).collect();
        let values: Vec<f32> = (0..2 * 3 * 32 * 32)
            .map(|i| ((i * 37 % 101) as f32 / 25.0) - 2.0)
            .collect();
        let images =
            Tensor::<Flex, 4>::from_data(TensorData::new(values.clone(), [2, 3, 32, 32]), &device);
        let out = model.forward(images, mask_tensor(&masks, 2, grid, &device));
        let loss: f32 = out.loss.into_scalar().elem();
        let rec: Vec<f32> = out.reconstruction.into_data().to_vec().expect("f32");
        let p = 32 / grid;
        let (mut sum, mut weight) = (0.0f64, 0.0f64);
        for (i, (&x, &y)) in values.iter().zip(&rec).enumerate() {
            let (b, row, col) = (i / (3 * 1024), (i / 32) % 32, i % 32);
            let masked = masks[b * grid * grid + (row / p) * grid + col / p] == 1;
            let w = match spec.area {
                LossArea::Masked => f64::from(u8::from(masked)),
                LossArea::All => 1.0,
            };
            let d = f64::from(x) - f64::from(y);
            let l = match spec.kind {
                LossKind::L1 => d.abs(),
                LossKind::L2 => d * d,
                LossKind::SmoothL1 if d.abs() < spec.beta => 0.5 * d * d / spec.beta,
                LossKind::SmoothL1 => d.abs() - 0.5 * spec.beta,
            };
            sum += l * w;
        }
        for b in 0..2 {
            for row in 0..32 {
                for col in 0..32 {
                    weight += match spec.area {
                        LossArea::Masked => {
                            f64::from(masks[b * grid * grid + (row / p) * grid + col / p])
                        }
                        LossArea::All => 1.0,
                    };
                }
            }
        }
        (f64::from(loss), sum / (weight + 1e-5) / 3.0)
    }

    #[test]
    fn every_loss_kind_and_area_is_the_formula() {
        let mut seen = Vec::new();
        for kind in [LossKind::L1, LossKind::SmoothL1, LossKind::L2] {
            for area in [LossArea::Masked, LossArea::All] {
                for beta in [1.0, 0.25] {
                    let spec = LossSpec {
                        kind,
                        beta,
                        area,
                        ..Default::default()
                    };
                    let (ours, host) = loss_and_host_loss(spec);
                    assert!(
                        (ours - host).abs() <= 1e-5 * host.abs().max(1.0),
                        "{spec:?}: {ours} vs {host}"
                    );
                    seen.push(ours);
                }
            }
        }
        // The variants differ (the test would pass trivially if the spec were ignored).
        // (An untrained head errs about as much on visible pixels as on masked ones.)
        assert!((seen[0] - seen[2]).abs() > 2e-5, "masked vs all: {seen:?}");
        assert!(
            (seen[0] - seen[4]).abs() > 1e-3,
            "l1 vs smooth_l1: {seen:?}"
        );
        assert!((seen[4] - seen[5]).abs() > 1e-3, "smooth_l1 beta: {seen:?}");
        assert!((seen[0] - seen[8]).abs() > 1e-3, "l1 vs l2: {seen:?}");
    }

    #[test]
    fn drop_path_is_random_in_training_and_off_in_inference() {
        let mut config = SimMimConfig::preset("swin_micro").expect("preset");
        if let EncoderConfig::Swin(c) = &mut config.encoder {
            c.img_size = 32;
            c.depths = vec![2, 2];
            c.num_heads = vec![3, 6];
            c.drop_path_rate = 0.5;
        }
        config.validate().expect("valid");
        let train = loss::<Autodiff<Flex>>(&config);
        assert_ne!(
            train[0], train[1],
            "drop path must vary between training passes"
        );
        let eval = loss::<Flex>(&config);
        assert_eq!(eval[0], eval[1], "no drop path without autodiff");
    }
}
