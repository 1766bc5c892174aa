//! The fine-tuning model: a pretrained encoder without the SimMIM head, average-pooled, and a
//! linear classifier, as the official `SwinTransformer` (avgpool + head) and the ViT with mean
//! pooling. Parameters keep the `encoder.` prefix of the pretraining checkpoint; the
//! classifier is `head`.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Tensor};

use crate::backend::SimMimBackend;
use crate::config::{EncoderConfig, SimMimConfig};
use crate::encoders::layers::linear;
use crate::encoders::swin::{Swin, SwinVersion};
use crate::encoders::vit::Vit;
use crate::encoders::Encoder;
use crate::error::ModelError;
use crate::weights::init::WeightInit;

#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    pub encoder: Encoder<B>,
    pub head: Linear<B>,
}

/// Building a classifier from the model config (its encoder part) and a class count.
pub trait InitClassifier {
    fn init_classifier<B: SimMimBackend>(
        &self,
        num_classes: usize,
        seed: u64,
        device: &B::Device,
    ) -> Result<Classifier<B>, ModelError>;
}

impl InitClassifier for SimMimConfig {
    fn init_classifier<B: SimMimBackend>(
        &self,
        num_classes: usize,
        seed: u64,
        device: &B::Device,
    ) -> Result<Classifier<B>, ModelError> {
        self.validate()?;
        if num_classes == 0 {
            return Err(ModelError::Config {
                field: "num_classes".into(),
                reason: "a classifier needs at least one class".into(),
            });
        }
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
        let features = self.encoder.num_features();
        Ok(Classifier {
            encoder,
            head: linear(&mut init, features, num_classes, true, device),
        })
    }
}

impl<B: SimMimBackend> Classifier<B> {
    /// Class logits `[B, classes]` for normalised images `[B, C, H, W]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        crate::encoders::layers::linear_rows(&self.head, self.features(images, None))
    }

    /// Average-pooled features `[B, C]`: of the final (normed) tokens, or, for a Swin, of the
    /// tokens leaving stage `stage` (before its patch merging); ViT ignores `stage`.
    pub fn features(&self, images: Tensor<B, 4>, stage: Option<usize>) -> Tensor<B, 2> {
        pooled_features(&self.encoder, images, stage)
    }

    pub fn num_classes(&self) -> usize {
        self.head.weight.dims()[1]
    }
}

/// Average-pooled unmasked features `[B, C]` of an encoder (see [`Classifier::features`]);
/// also what the probe reads from a SimMIM model during pretraining.
pub fn pooled_features<B: SimMimBackend>(
    encoder: &Encoder<B>,
    images: Tensor<B, 4>,
    stage: Option<usize>,
) -> Tensor<B, 2> {
    let tokens = match (encoder, stage) {
        (Encoder::Swin(swin), Some(stage)) => swin.stage_tokens(images, stage),
        (encoder, _) => encoder.forward(images, None),
    };
    let [batch, _, dim] = tokens.dims();
    tokens.mean_dim(1).reshape([batch, dim])
}

/// Cross-entropy against soft targets `[B, classes]` (one-hot, label-smoothed or mixed),
/// averaged over the batch: timm's `SoftTargetCrossEntropy`.
pub fn soft_cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2>) -> Tensor<B, 1> {
    let [batch, _] = logits.dims();
    (log_softmax(logits, 1) * targets)
        .sum()
        .neg()
        .div_scalar(batch as f64)
}

/// Soft targets for `labels`: `1 - smoothing + smoothing / classes` on the label and
/// `smoothing / classes` elsewhere, as timm's `LabelSmoothingCrossEntropy` spreads it.
pub fn smoothed_targets(labels: &[u32], classes: usize, smoothing: f64) -> Vec<f32> {
    let off = (smoothing / classes as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut targets = vec![off; labels.len() * classes];
    for (row, &label) in labels.iter().enumerate() {
        targets[row * classes + label as usize] = on;
    }
    targets
}

/// How many of `labels` are among the top 1 and top `k` of each row of `logits`
/// (`[B, classes]`, row-major); ties go to the lower class index.
pub fn top_k_correct(logits: &[f32], labels: &[u32], classes: usize, k: usize) -> (u64, u64) {
    let (mut top1, mut topk) = (0, 0);
    for (row, &label) in labels.iter().enumerate() {
        let scores = &logits[row * classes..(row + 1) * classes];
        let target = scores[label as usize];
        let rank = scores
            .iter()
            .enumerate()
            .filter(|&(c, &s)| s > target || (s == target && c < label as usize))
            .count();
        top1 += u64::from(rank == 0);
        topk += u64::from(rank < k);
    }
    (top1, topk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use burn_flex::Flex;

    #[test]
    fn soft_cross_entropy_of_one_hot_targets_is_the_usual_loss() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::from_data(
            TensorData::new(vec![2.0f32, 0.0, -1.0, 0.5, 0.5, 3.0], [2, 3]),
            &device,
        );
        let targets = Tensor::<Flex, 2>::from_data(
            TensorData::new(smoothed_targets(&[0, 2], 3, 0.0), [2, 3]),
            &device,
        );
        let loss: f32 = soft_cross_entropy(logits, targets).into_scalar();
        let ce = |row: [f64; 3], label: usize| {
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            lse - row[label]
        };
        let expected = (ce([2.0, 0.0, -1.0], 0) + ce([0.5, 0.5, 3.0], 2)) / 2.0;
        assert!(
            (f64::from(loss) - expected).abs() < 1e-5,
            "{loss} vs {expected}"
        );
    }

    #[test]
    fn smoothing_spreads_the_mass_as_timm() {
        let t = smoothed_targets(&[1], 4, 0.1);
        for (got, want) in t.iter().zip([0.025, 0.925, 0.025, 0.025]) {
            assert!((got - want).abs() < 1e-6, "{t:?}");
        }
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_counts_ranks() {
        let logits = [
            0.1, 0.7, 0.2, /* */ 0.5, 0.3, 0.2, /* */ 0.3, 0.3, 0.4,
        ];
        // Row 0 label 1: first. Row 1 label 2: third. Row 2 label 1: behind 2, and behind 0
        // on the tie: third.
        assert_eq!(top_k_correct(&logits, &[1, 2, 1], 3, 2), (1, 1));
        assert_eq!(top_k_correct(&logits, &[1, 0, 2], 3, 1), (3, 3));
    }
}
