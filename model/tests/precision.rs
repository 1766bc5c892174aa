//! Mixed precision (`precision::autocast` with bf16) against f32 on the same model, data and
//! optimizer: the losses track, and weights, gradients and AdamW state stay f32.

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::Flex;
use simmim_model::backend::precision::{autocast, Precision};
use simmim_model::{loss_and_grads, mask_tensor, AdamW, AdamWConfig, InitModel};

type B = Autodiff<Flex>;

/// The dtypes of every weight and of its gradient in `grads` (what AdamW's moments are made of).
fn dtypes<M: Module<B>>(module: &M, grads: &GradientsParams) -> Vec<DType> {
    struct Collect<'a>(Vec<DType>, &'a GradientsParams);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().dtype());
            if let Some(grad) = self.1.get::<B::InnerBackend, D>(param.id) {
                self.0.push(grad.dtype());
            }
        }
    }
    let mut collect = Collect(Vec::new(), grads);
    module.visit(&mut collect);
    collect.0
}

/// Losses of `steps` AdamW steps from the same initialisation, images and masks.
fn losses(precision: Precision, steps: usize) -> Vec<f64> {
    let config = crate::common::small_swin_config();
    let device = Default::default();
    let mut model = config.init::<B>(7, &device).expect("model");
    let mut optimizer = AdamW::<Flex>::new(AdamWConfig::default());
    let geometry = config.mask_geometry().expect("geometry");
    let batch = 4;
    let masks: Vec<u8> = (0..batch as u64)
        .flat_map(|i| geometry.generate(i))
        .collect();
    let mask = mask_tensor::<B>(&masks, batch, geometry.token_grid(), &device);
    // Smooth images (low-frequency waves), so there is something to learn.
    let pixels: Vec<f32> = (0..batch * 3 * 32 * 32)
        .map(|i| {
            let (image, y, x) = (i / (3 * 1024), (i / 32) % 32, i % 32);
            ((x as f32 * 0.3 + image as f32).sin() + (y as f32 * 0.2).cos()) * 0.8
        })
        .collect();
    let images = Tensor::<B, 4>::from_data(TensorData::new(pixels, [batch, 3, 32, 32]), &device);
    let mut out = Vec::new();
    for _ in 0..steps {
        let (loss, grads) = autocast(precision, || {
            loss_and_grads(&model, images.clone(), mask.clone(), 2)
        });
        out.push(loss);
        let seen = dtypes(&model, &grads);
        assert!(seen.len() > 100, "{} weights and gradients", seen.len());
        assert!(
            seen.iter().all(|d| *d == DType::F32),
            "weights and gradients must stay f32 under {precision:?}"
        );
        model = optimizer.step(2e-3, model, grads).0;
    }
    out
}

#[test]
fn bf16_autocast_tracks_the_f32_run() {
    let steps = 12;
    let f32_losses = losses(Precision::F32, steps);
    let bf16_losses = losses(Precision::Bf16, steps);
    for (step, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        let gap = (a - b).abs() / a;
        assert!(gap < 0.03, "step {step}: f32 {a} vs bf16 {b} ({gap:.4})");
    }
    // bf16 must actually change the arithmetic, and both runs must learn.
    assert!(f32_losses.iter().zip(&bf16_losses).any(|(a, b)| a != b));
    for run in [&f32_losses, &bf16_losses] {
        assert!(run[steps - 1] < 0.8 * run[0], "{run:?}");
    }
}
