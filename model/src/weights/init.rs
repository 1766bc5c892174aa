//! Seeded, host-side weight initialisation following the official SimMIM code (trunc-normal
//! 0.02 for linear weights and tokens, PyTorch's default for convolutions). Drawing on the host
//! from one seed makes every rank and every backend start from bit-identical weights.

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct WeightInit {
    rng: ChaCha8Rng,
}

impl WeightInit {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `timm.trunc_normal_(std)`: normal(0, std) truncated to [-2, 2] (absolute bounds).
    pub fn trunc_normal<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        std: f64,
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| loop {
                let v = std * self.standard_normal();
                if (-2.0..=2.0).contains(&v) {
                    break v as f32;
                }
            })
            .collect();
        Param::from_data(TensorData::new(values, shape), device)
    }

    /// PyTorch's default for conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub fn fan_in_uniform<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        fan_in: usize,
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        Param::from_data(TensorData::new(values, shape), device)
    }

    fn standard_normal(&mut self) -> f64 {
        // Box-Muller; one of the pair is enough here.
        let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

pub fn constant<B: Backend, const D: usize>(
    shape: [usize; D],
    value: f32,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let count = shape.iter().product();
    Param::from_data(TensorData::new(vec![value; count], shape), device)
}
