//! The backends the model runs on, and the one op it brings itself: exact (erf) GELU.
//!
//! burn-flex evaluates GELU and its gradient element by element through a scalar `erff` and
//! `expf` on one thread; on the Swin step that was the largest cost after the matmuls. The
//! CPU kernel here uses a rational erf approximation and a range-reduced exp that the
//! compiler vectorises, split across threads. Other backends keep their own GELU.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{ActivationOps, FloatTensor};
use burn::tensor::{DType, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};
use burn_flex::{Flex, FlexTensor};

/// A Burn backend the SimMIM model can run on.
pub trait SimMimBackend: Backend {
    /// `x * Φ(x)` with the exact normal CDF, as `torch.nn.GELU()`.
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad * d/dx[x * Φ(x)]`.
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }
}

impl SimMimBackend for Flex {
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Self::gelu(x);
        }
        let x = x.to_contiguous();
        let shape = x.layout().shape().clone();
        let Some(input) = x.as_slice::<f32>() else {
            return Self::gelu(x);
        };
        let out = map_parallel(input, None, |x, _| gelu(x));
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return Self::gelu_backward(x, grad);
        }
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        let shape = x.layout().shape().clone();
        let (Some(input), Some(upstream)) = (x.as_slice::<f32>(), grad.as_slice::<f32>()) else {
            return Self::gelu_backward(x, grad);
        };
        if input.len() != upstream.len() {
            return Self::gelu_backward(x, grad);
        }
        let out = map_parallel(input, Some(upstream), |x, g| g * gelu_derivative(x));
        FlexTensor::from_data(TensorData::new(out, shape))
    }
}

#[cfg(feature = "ndarray")]
impl SimMimBackend for burn_ndarray::NdArray {}

#[cfg(feature = "cuda")]
impl SimMimBackend for burn_cuda::Cuda<f32> {}
#[cfg(feature = "cuda")]
impl SimMimBackend for burn_cuda::Cuda<burn::tensor::bf16> {}
#[cfg(feature = "cuda")]
impl SimMimBackend for burn_cuda::Cuda<burn::tensor::f16> {}

impl<B: SimMimBackend, C: CheckpointStrategy> SimMimBackend for Autodiff<B, C> {
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluExact;

        impl<B: SimMimBackend> Backward<B, 1> for GeluExact {
            type State = NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let input: FloatTensor<B> = checkpointer.retrieve_node_output(ops.state);
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::gelu_exact_backward(input, grad)
                });
            }
        }

        match GeluExact
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::gelu_exact(x.primitive.clone()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_exact(x.primitive)),
        }
    }
}

/// Applies `op(x[i], g[i])` over chunks on all cores (`g` is 0 when absent).
fn map_parallel(
    input: &[f32],
    other: Option<&[f32]>,
    op: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    const CHUNK: usize = 1 << 15;
    let mut out = vec![0f32; input.len()];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || input.len() < 4 * CHUNK {
        apply(&mut out, input, other, &op);
        return out;
    }
    let per_thread = input.len().div_ceil(threads).div_ceil(CHUNK) * CHUNK;
    std::thread::scope(|scope| {
        for (index, out) in out.chunks_mut(per_thread).enumerate() {
            let start = index * per_thread;
            let input = &input[start..start + out.len()];
            let other = other.map(|o| &o[start..start + out.len()]);
            let op = &op;
            scope.spawn(move || apply(out, input, other, op));
        }
    });
    out
}

#[inline(always)]
fn apply(out: &mut [f32], input: &[f32], other: Option<&[f32]>, op: &impl Fn(f32, f32) -> f32) {
    match other {
        Some(other) => {
            for ((o, &x), &g) in out.iter_mut().zip(input).zip(other) {
                *o = op(x, g);
            }
        }
        None => {
            for (o, &x) in out.iter_mut().zip(input) {
                *o = op(x, 0.0);
            }
        }
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
    cdf + x * FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
}

/// erf for f32: odd/even rational minimax approximation on [-4, 4] (|error| about 1e-7,
/// the float's own resolution), saturating outside, where erf is ±1 in f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_1e-3;
    p = p * x2 - 1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_473_9e-2;
    p / q
}

/// e^y for y <= 0: y = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, and 2^n
/// built in the exponent bits. Relative error about 2e-7; inputs below -87 give e^-87
/// (1.6e-38), which is zero for every use here.
#[inline(always)]
fn exp_nonpositive(y: f32) -> f32 {
    let y = y.max(-87.0);
    // Round to nearest with the 1.5 * 2^23 trick (vectorises without SSE4.1's round).
    const SHIFTER: f32 = 12_582_912.0;
    let n = (y * std::f32::consts::LOG2_E + SHIFTER) - SHIFTER;
    let r = y - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut e = 1.0 / 720.0_f32;
    e = e * r + 1.0 / 120.0;
    e = e * r + 1.0 / 24.0;
    e = e * r + 1.0 / 6.0;
    e = e * r + 0.5;
    e = e * r + 1.0;
    e = e * r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    e * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_f64(x: f64) -> f64 {
        // erf through the complementary function's continued fraction is overkill; the
        // Abramowitz-Stegun 7.1.26 bound (1.5e-7) is not tight enough, so integrate instead.
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut sum = f(0.0) + f(x);
        for i in 1..n {
            sum += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        sum * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_the_integral() {
        let mut worst = 0f64;
        for i in -600..=600 {
            let x = i as f64 / 100.0;
            worst = worst.max((erf(x as f32) as f64 - erf_f64(x)).abs());
        }
        assert!(worst < 5e-7, "worst erf error {worst}");
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        for i in 0..=8700 {
            let y = -(i as f32) / 100.0;
            let rel = ((exp_nonpositive(y) as f64) - (y as f64).exp()).abs() / (y as f64).exp();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst exp relative error {worst}");
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }

    #[test]
    fn gelu_derivative_matches_finite_differences() {
        for i in -80..=80 {
            let x = i as f64 / 10.0;
            let exact = |x: f64| 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2));
            let fd = (exact(x + 1e-4) - exact(x - 1e-4)) / 2e-4;
            let got = gelu_derivative(x as f32) as f64;
            assert!((got - fd).abs() < 2e-5, "x={x}: {got} vs {fd}");
            assert!((gelu(x as f32) as f64 - exact(x)).abs() < 2e-6 * (1.0 + x.abs()));
        }
    }
}
