//! How good are frozen features? k-NN (cosine similarity, the temperature-weighted vote of
//! InstDisc/DINO) and a linear probe (softmax regression on standardised features), both
//! cheap enough to run while pretraining.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

/// Features `[rows, dim]` row-major with a label per row.
pub struct Features<'a> {
    pub values: &'a [f32],
    pub labels: &'a [u32],
    pub dim: usize,
}

impl Features<'_> {
    fn rows(&self) -> usize {
        self.labels.len()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// Vote temperature of the weighted k-NN classifier (as DINO's evaluation).
const KNN_TEMPERATURE: f32 = 0.07;

/// Top-1 accuracy of a k-NN vote: each test row's `k` most cosine-similar train rows vote
/// for their class with weight `exp(similarity / 0.07)`.
pub fn knn_top1(train: &Features, test: &Features, classes: usize, k: usize) -> f64 {
    let normalise = |f: &Features| -> Vec<f32> {
        (0..f.rows())
            .flat_map(|i| {
                let row = f.row(i);
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter().map(move |v| v / norm)
            })
            .collect()
    };
    let (train_n, test_n) = (normalise(train), normalise(test));
    let dim = train.dim;
    let k = k.min(train.rows()).max(1);
    let correct: usize = (0..test.rows())
        .into_par_iter()
        .filter(|&i| {
            let query = &test_n[i * dim..(i + 1) * dim];
            let mut sims: Vec<(f32, u32)> = (0..train.rows())
                .map(|j| {
                    let row = &train_n[j * dim..(j + 1) * dim];
                    (
                        query.iter().zip(row).map(|(a, b)| a * b).sum(),
                        train.labels[j],
                    )
                })
                .collect();
            sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0f32; classes];
            for &(sim, label) in &sims[..k] {
                votes[label as usize] += (sim / KNN_TEMPERATURE).exp();
            }
            argmax(&votes) == test.labels[i] as usize
        })
        .count();
    correct as f64 / test.rows().max(1) as f64
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Iterations of full-batch Adam for the linear probe.
const LINEAR_ITERATIONS: usize = 300;

/// Top-1 accuracy of softmax regression fitted on `train` (features standardised with the
/// train statistics; full-batch Adam, lr 0.01, L2 1e-4), on `B` for the matrix products.
pub fn linear_top1<B: Backend>(
    train: &Features,
    test: &Features,
    classes: usize,
    device: &B::Device,
) -> f64 {
    let (n, dim) = (train.rows(), train.dim);
    if n == 0 || test.rows() == 0 {
        return 0.0;
    }
    let mut mean = vec![0f64; dim];
    let mut var = vec![0f64; dim];
    for i in 0..n {
        for (d, v) in train.row(i).iter().enumerate() {
            mean[d] += f64::from(*v) / n as f64;
        }
    }
    for i in 0..n {
        for (d, v) in train.row(i).iter().enumerate() {
            var[d] += (f64::from(*v) - mean[d]).powi(2) / n as f64;
        }
    }
    let standardise = |f: &Features| -> Tensor<B, 2> {
        let values: Vec<f32> = (0..f.rows())
            .flat_map(|i| {
                f.row(i)
                    .iter()
                    .enumerate()
                    .map(|(d, v)| ((f64::from(*v) - mean[d]) / (var[d].sqrt() + 1e-6)) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        Tensor::from_data(TensorData::new(values, [f.rows(), dim]), device)
    };
    let x = standardise(train);
    let mut onehot = vec![0f32; n * classes];
    for (i, &label) in train.labels.iter().enumerate() {
        onehot[i * classes + label as usize] = 1.0;
    }
    let y = Tensor::<B, 2>::from_data(TensorData::new(onehot, [n, classes]), device);
    let xt = x.clone().transpose();

    let (lr, l2, beta1, beta2, eps) = (0.01f64, 1e-4f64, 0.9f64, 0.999f64, 1e-8f64);
    let mut w = Tensor::<B, 2>::zeros([dim, classes], device);
    let mut b = Tensor::<B, 1>::zeros([classes], device);
    let (mut mw, mut vw) = (w.clone(), w.clone());
    let (mut mb, mut vb) = (b.clone(), b.clone());
    for t in 1..=LINEAR_ITERATIONS {
        let logits = x.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
        let error = (softmax(logits, 1) - y.clone()).div_scalar(n as f64);
        let gw = xt.clone().matmul(error.clone()) + w.clone().mul_scalar(l2);
        let gb = error.sum_dim(0).reshape([classes]);
        mw = mw.mul_scalar(beta1) + gw.clone().mul_scalar(1.0 - beta1);
        vw = vw.mul_scalar(beta2) + gw.square().mul_scalar(1.0 - beta2);
        mb = mb.mul_scalar(beta1) + gb.clone().mul_scalar(1.0 - beta1);
        vb = vb.mul_scalar(beta2) + gb.square().mul_scalar(1.0 - beta2);
        let (c1, c2) = (
            1.0 - beta1.powi(t as i32),
            (1.0 - beta2.powi(t as i32)).sqrt(),
        );
        w = w - mw.clone().mul_scalar(lr / c1) / vw.clone().sqrt().div_scalar(c2).add_scalar(eps);
        b = b - mb.clone().mul_scalar(lr / c1) / vb.clone().sqrt().div_scalar(c2).add_scalar(eps);
    }
    let scores: Vec<f32> = (standardise(test).matmul(w) + b.unsqueeze_dim(0))
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let correct = (0..test.rows())
        .filter(|&i| argmax(&scores[i * classes..(i + 1) * classes]) == test.labels[i] as usize)
        .count();
    correct as f64 / test.rows() as f64
}

/// The labelled images a probe fits on and scores, with the same classes.
pub struct ProbeSets {
    pub train: crate::data::dataset::Dataset,
    pub test: crate::data::dataset::Dataset,
    pub classes: usize,
}

impl ProbeSets {
    pub fn open(
        train: &str,
        test: &str,
        (train_limit, test_limit): (usize, usize),
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, crate::data::DataError> {
        use crate::data::dataset::Dataset;
        let train_set = Dataset::open(train, runtime.clone())?;
        let test_set = Dataset::open(test, runtime.clone())?;
        train_set.check_same_classes(&test_set, test)?;
        Ok(Self {
            classes: train_set.classes().len(),
            train: train_set.spread(train_limit),
            test: test_set.spread(test_limit),
        })
    }
}

/// k-NN and linear-probe top-1 of `encoder`'s pooled features (`dim` wide, from `stage`).
/// `gather` sums a buffer over the ranks that share the work (identity for one process).
pub fn probe<B: simmim_model::SimMimBackend>(
    encoder: &simmim_model::Encoder<B>,
    sets: &ProbeSets,
    (stage, dim, k): (Option<usize>, usize, usize),
    spec: &crate::eval::EvalSpec,
    gather: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
    device: &B::Device,
) -> anyhow::Result<(f64, f64)> {
    let mut collect =
        |dataset: &crate::data::dataset::Dataset| -> anyhow::Result<(Vec<f32>, Vec<u32>)> {
            let (mut rows, mut present) =
                crate::eval::features_share(encoder, dataset, (stage, dim), spec, device)?;
            gather(&mut rows)?;
            gather(&mut present)?;
            let mut values = Vec::with_capacity(rows.len());
            let mut labels = Vec::with_capacity(present.len());
            for (id, &here) in present.iter().enumerate() {
                if here > 0.0 {
                    values.extend_from_slice(&rows[id * dim..(id + 1) * dim]);
                    labels.push(dataset.label(id));
                }
            }
            Ok((values, labels))
        };
    let (train_values, train_labels) = collect(&sets.train)?;
    let (test_values, test_labels) = collect(&sets.test)?;
    let train = Features {
        values: &train_values,
        labels: &train_labels,
        dim,
    };
    let test = Features {
        values: &test_values,
        labels: &test_labels,
        dim,
    };
    let knn = knn_top1(&train, &test, sets.classes, k);
    let linear = linear_top1::<B>(&train, &test, sets.classes, device);
    Ok((knn, linear))
}

/// Width of the pooled features of `stage` (default: the final ones).
pub fn feature_dim(encoder: &simmim_model::EncoderConfig, stage: Option<usize>) -> usize {
    match (encoder, stage) {
        (encoder, Some(s)) => match encoder.swin() {
            Some(c) if s + 1 < c.depths.len() => c.stage_dim(s),
            _ => encoder.num_features(),
        },
        _ => encoder.num_features(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;
    use rand::{Rng, SeedableRng};

    /// Two classes as two noisy clusters in 8 dimensions, separable by a hyperplane.
    fn clusters(per_class: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut values = Vec::new();
        let mut labels = Vec::new();
        for i in 0..2 * per_class {
            let label = (i % 2) as u32;
            for d in 0..8 {
                let centre = if d == 0 { 1.0 } else { 0.2 } * if label == 0 { 1.0 } else { -1.0 };
                values.push(centre + rng.random_range(-0.3f32..0.3));
            }
            labels.push(label);
        }
        (values, labels)
    }

    #[test]
    fn both_probes_separate_clusters_and_fail_on_shuffled_labels() {
        let (train_v, train_l) = clusters(100, 1);
        let (test_v, test_l) = clusters(50, 2);
        let train = Features {
            values: &train_v,
            labels: &train_l,
            dim: 8,
        };
        let test = Features {
            values: &test_v,
            labels: &test_l,
            dim: 8,
        };
        assert!(knn_top1(&train, &test, 2, 5) > 0.95);
        assert!(linear_top1::<Flex>(&train, &test, 2, &Default::default()) > 0.95);

        // Labels unrelated to the features: about chance.
        let noise: Vec<u32> = (0..train_l.len()).map(|i| ((i / 2) % 2) as u32).collect();
        let train = Features {
            values: &train_v,
            labels: &noise,
            dim: 8,
        };
        let knn = knn_top1(&train, &test, 2, 5);
        assert!((0.2..0.8).contains(&knn), "k-NN on noise labels: {knn}");
    }
}
