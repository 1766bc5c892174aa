//! Forward passes over labelled images without training: test accuracy of a classifier, and
//! pooled features for the probe. Each rank takes every `world`-th image, so the work splits
//! across workers and a sum over ranks gives the whole set.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use simmim_model::classifier::{pooled_features, top_k_correct};
use simmim_model::{Classifier, Encoder, SimMimBackend};

use crate::data::augment::evaluation_pixels;
use crate::data::dataset::Dataset;
use crate::data::DataError;

/// How images are turned into inputs and batched.
#[derive(Debug, Clone, Copy)]
pub struct EvalSpec {
    pub img_size: usize,
    pub crop_pct: Option<f64>,
    pub batch: usize,
    pub rank: usize,
    pub world: usize,
}

impl EvalSpec {
    fn my_ids(&self, len: usize) -> Vec<usize> {
        (self.rank..len).step_by(self.world.max(1)).collect()
    }
}

/// Decoded inputs of `ids` (unreadable images are logged and left out).
fn decode(dataset: &Dataset, ids: &[usize], spec: &EvalSpec) -> (Vec<f32>, Vec<usize>) {
    let decoded: Vec<Option<Vec<f32>>> = ids
        .par_iter()
        .map(|&id| {
            let result = dataset.read(id).and_then(|raw| {
                evaluation_pixels(&raw.bytes, &raw.name, spec.img_size, spec.crop_pct)
            });
            match result {
                Ok(pixels) => Some(pixels),
                Err(e) => {
                    tracing::warn!("evaluation skips an unreadable image: {e}");
                    None
                }
            }
        })
        .collect();
    let mut pixels = Vec::new();
    let mut kept = Vec::new();
    for (id, sample) in ids.iter().zip(decoded) {
        if let Some(sample) = sample {
            pixels.extend_from_slice(&sample);
            kept.push(*id);
        }
    }
    (pixels, kept)
}

fn to_tensor<B: Backend>(
    pixels: Vec<f32>,
    count: usize,
    side: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(pixels, [count, 3, side, side]), device)
}

/// This rank's `[top-1 correct, top-5 correct, images scored]` of `model` on `dataset`.
pub fn accuracy_share<B: SimMimBackend>(
    model: &Classifier<B>,
    dataset: &Dataset,
    spec: &EvalSpec,
    device: &B::Device,
) -> Result<[f32; 3], DataError> {
    let classes = model.num_classes();
    let mut totals = [0f32; 3];
    for chunk in spec.my_ids(dataset.len()).chunks(spec.batch.max(1)) {
        let (pixels, kept) = decode(dataset, chunk, spec);
        if kept.is_empty() {
            continue;
        }
        let logits: Vec<f32> = model
            .forward(to_tensor::<B>(pixels, kept.len(), spec.img_size, device))
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| DataError::Dataset {
                location: "evaluation".into(),
                reason: format!("reading logits: {e:?}"),
            })?;
        let labels: Vec<u32> = kept.iter().map(|&id| dataset.label(id)).collect();
        let (top1, top5) = top_k_correct(&logits, &labels, classes, 5);
        totals[0] += top1 as f32;
        totals[1] += top5 as f32;
        totals[2] += kept.len() as f32;
    }
    Ok(totals)
}

/// Pooled features (`dim` wide) of this rank's images, written into the rows of a zeroed
/// `[dataset.len(), dim]` buffer (other ranks fill the other rows; a sum gathers them), and
/// a `[dataset.len()]` buffer with 1 where this rank read the image.
pub fn features_share<B: SimMimBackend>(
    encoder: &Encoder<B>,
    dataset: &Dataset,
    (stage, dim): (Option<usize>, usize),
    spec: &EvalSpec,
    device: &B::Device,
) -> Result<(Vec<f32>, Vec<f32>), DataError> {
    let mut rows = vec![0f32; dataset.len() * dim];
    let mut present = vec![0f32; dataset.len()];
    for chunk in spec.my_ids(dataset.len()).chunks(spec.batch.max(1)) {
        let (pixels, kept) = decode(dataset, chunk, spec);
        if kept.is_empty() {
            continue;
        }
        let features = pooled_features(
            encoder,
            to_tensor::<B>(pixels, kept.len(), spec.img_size, device),
            stage,
        );
        let values: Vec<f32> = features
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| DataError::Dataset {
                location: "probe".into(),
                reason: format!("reading features: {e:?}"),
            })?;
        for (row, &id) in kept.iter().enumerate() {
            rows[id * dim..(id + 1) * dim].copy_from_slice(&values[row * dim..(row + 1) * dim]);
            present[id] = 1.0;
        }
    }
    Ok((rows, present))
}
