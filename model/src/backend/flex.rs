//! The CPU backend's kernels behind the trait: each takes contiguous f32 inputs and hands
//! anything else to Burn's ops.

use burn::tensor::ops::{ActivationOps, FloatTensor};
use burn::tensor::{DType, TensorData};
use burn_flex::{Flex, FlexTensor};

use super::decomposed::{
    adamw_update_decomposed, attention_backward, attention_forward, layer_norm_backward_decomposed,
    softmax_backward_decomposed, weighted_sum_decomposed, AdamWUpdate,
};
use super::kernels::{self, adamw as optim_kernel, attention as attention_kernel};
use super::{float, SimMimBackend};

impl SimMimBackend for Flex {
    fn has_attention_kernel() -> bool {
        true
    }

    fn weighted_sum(parts: Vec<FloatTensor<Self>>, weights: &[f64]) -> Option<FloatTensor<Self>> {
        let parts: Vec<FlexTensor> = parts.into_iter().map(|t| t.to_contiguous()).collect();
        let first = parts.first()?;
        let shape = first.layout().shape().clone();
        let slices: Option<Vec<&[f32]>> = parts
            .iter()
            .map(|t| {
                t.as_slice::<f32>()
                    .filter(|s| s.len() == shape.num_elements())
            })
            .collect();
        match slices.and_then(|slices| optim_kernel::weighted_sum(&slices, weights)) {
            Some(sum) => Some(FlexTensor::from_data(TensorData::new(sum, shape))),
            None => weighted_sum_decomposed::<Self>(parts, weights),
        }
    }

    fn adamw_update(
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: &AdamWUpdate,
    ) -> [FloatTensor<Self>; 3] {
        let contiguous = |t: FloatTensor<Self>| t.to_contiguous();
        let (value, grad) = (contiguous(value), contiguous(grad));
        let moments = moments.map(|(m, v)| (contiguous(m), contiguous(v)));
        // `as_slice` is `None` for a tensor that is not f32: the decomposition takes those.
        let slices = (
            value.as_slice::<f32>(),
            grad.as_slice::<f32>(),
            moments
                .as_ref()
                .map(|(m, v)| (m.as_slice::<f32>(), v.as_slice::<f32>())),
        );
        let shape = value.layout().shape().clone();
        let kernel = match slices {
            (Some(w), Some(g), None) => Some(optim_kernel::adamw(w, g, None, update)),
            (Some(w), Some(g), Some((Some(m), Some(v)))) => {
                Some(optim_kernel::adamw(w, g, Some((m, v)), update))
            }
            _ => None,
        };
        match kernel.flatten() {
            Some(outputs) => {
                outputs.map(|values| FlexTensor::from_data(TensorData::new(values, shape.clone())))
            }
            None => adamw_update_decomposed::<Self>(value, grad, moments, update),
        }
    }

    fn qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (qkv, bias) = (qkv.to_contiguous(), bias.to_contiguous());
        let kernel = match (qkv.as_slice::<f32>(), bias.as_slice::<f32>()) {
            (Some(q), Some(b)) => {
                let bias_dims = bias.layout().shape();
                let lengths = attention_kernel::Lengths {
                    qkv: q.len(),
                    bias: Some(b.len()),
                    ..Default::default()
                };
                (bias_dims.num_dims() == 4)
                    .then(|| {
                        attention_kernel::Shape::of(
                            qkv.layout().shape(),
                            heads,
                            bias_dims[0],
                            lengths,
                        )
                    })
                    .flatten()
                    .map(|shape| (shape, q, b))
            }
            _ => None,
        };
        let Some((shape, q, b)) = kernel else {
            let (out, probs) = attention_forward::<Self>(float(qkv), float(bias), heads, scale);
            return (
                out.into_primitive().tensor(),
                probs.into_primitive().tensor(),
            );
        };
        let (out, probs) = attention_kernel::forward(q, b, shape, scale as f32);
        let (g, n, c) = (shape.groups, shape.tokens, shape.dim);
        (
            FlexTensor::from_data(TensorData::new(out, [g, n, c])),
            FlexTensor::from_data(TensorData::new(probs, [g, heads, n, n])),
        )
    }

    fn qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        bias_groups: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (qkv, probs, grad) = (
            qkv.to_contiguous(),
            probs.to_contiguous(),
            grad.to_contiguous(),
        );
        let qkv_shape = qkv.layout().shape().clone();
        let slices = (
            qkv.as_slice::<f32>(),
            probs.as_slice::<f32>(),
            grad.as_slice::<f32>(),
        );
        let kernel = match slices {
            (Some(q), Some(p), Some(g)) if probs.layout().shape().num_dims() == 4 => {
                let lengths = attention_kernel::Lengths {
                    qkv: q.len(),
                    probs: Some(p.len()),
                    out: Some(g.len()),
                    ..Default::default()
                };
                let heads = probs.layout().shape()[1];
                attention_kernel::Shape::of(&qkv_shape, heads, bias_groups, lengths)
                    .map(|shape| (shape, q, p, g))
            }
            _ => None,
        };
        let Some((shape, q, p, g)) = kernel else {
            let (d_qkv, d_bias) = attention_backward::<Self>(
                float(qkv),
                float(probs),
                float(grad),
                bias_groups,
                scale,
            );
            return (
                d_qkv.into_primitive().tensor(),
                d_bias.into_primitive().tensor(),
            );
        };
        let (d_qkv, d_bias) = attention_kernel::backward(q, p, g, shape, scale as f32);
        let (n, heads) = (shape.tokens, shape.heads);
        (
            FlexTensor::from_data(TensorData::new(d_qkv, qkv_shape)),
            FlexTensor::from_data(TensorData::new(d_bias, [bias_groups, heads, n, n])),
        )
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Self::gelu(x);
        }
        let x = x.to_contiguous();
        let shape = x.layout().shape().clone();
        let Some(input) = x.as_slice::<f32>() else {
            return Self::gelu(x);
        };
        let out = kernels::rows::map_parallel(input, None, |x, _| kernels::math::gelu(x));
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
        let out = kernels::rows::map_parallel(input, Some(upstream), |x, g| {
            g * kernels::math::gelu_derivative(x)
        });
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (y, grad) = (y.to_contiguous(), grad.to_contiguous());
        let shape = y.layout().shape().clone();
        let width = shape[shape.num_dims() - 1];
        let f32s = y.dtype() == DType::F32 && grad.dtype() == DType::F32;
        let (Some(ys), Some(gs)) = (y.as_slice::<f32>(), grad.as_slice::<f32>()) else {
            return softmax_backward_decomposed::<Flex>(y, grad);
        };
        if !f32s || width == 0 || ys.len() != gs.len() {
            return softmax_backward_decomposed::<Flex>(y, grad);
        }
        let mut out = vec![0f32; ys.len()];
        let rows_per_task = (1usize << 15).div_ceil(width);
        kernels::rows::for_row_blocks(&mut out, width, rows_per_task, |start, block| {
            let (ys, gs) = (
                &ys[start..start + block.len()],
                &gs[start..start + block.len()],
            );
            for ((o, y), g) in block
                .chunks_exact_mut(width)
                .zip(ys.chunks_exact(width))
                .zip(gs.chunks_exact(width))
            {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for k in 0..width {
                    o[k] = y[k] * (g[k] - dot);
                }
            }
        });
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn layer_norm_affine_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 3] {
        let all_f32 = [&x, &gamma, &grad].iter().all(|t| t.dtype() == DType::F32);
        let (x, gamma, grad) = (
            x.to_contiguous(),
            gamma.to_contiguous(),
            grad.to_contiguous(),
        );
        let shape = x.layout().shape().clone();
        let gamma_shape = gamma.layout().shape().clone();
        let slices = (
            x.as_slice::<f32>(),
            gamma.as_slice::<f32>(),
            grad.as_slice::<f32>(),
        );
        let (Some(xs), Some(gs), Some(ds)) = slices else {
            return layer_norm_backward_decomposed::<Flex>(x, gamma, grad, epsilon);
        };
        if !all_f32 || gs.is_empty() || xs.len() != ds.len() || xs.len() % gs.len() != 0 {
            return layer_norm_backward_decomposed::<Flex>(x, gamma, grad, epsilon);
        }
        let (dx, dgamma, dbeta) = kernels::layer_norm::backward_rows(xs, gs, ds, epsilon as f32);
        [
            FlexTensor::from_data(TensorData::new(dx, shape)),
            FlexTensor::from_data(TensorData::new(dgamma, gamma_shape.clone())),
            FlexTensor::from_data(TensorData::new(dbeta, gamma_shape)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kernels::math::{erf, exp_nonpositive, gelu, gelu_derivative};
    use burn::tensor::Tensor;

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

    /// The fused LayerNorm (Flex kernel, and the decomposed default on NdArray-free Flex
    /// fallback) against Burn's LayerNorm differentiated through its decomposition.
    #[test]
    fn layer_norm_gradients_match_burns_decomposition() {
        use burn::backend::Autodiff;
        use burn::nn::LayerNormConfig;
        use burn::tensor::Distribution;
        type AD = Autodiff<Flex>;
        let device = Default::default();
        for rows in [300, 2000] {
            let width = 48;
            let x = Tensor::<AD, 2>::random([rows, width], Distribution::Normal(0.5, 2.0), &device)
                .require_grad();
            let upstream =
                Tensor::<AD, 2>::random([rows, width], Distribution::Normal(0.0, 1.0), &device);
            let mut reference = LayerNormConfig::new(width)
                .with_epsilon(1e-5)
                .init::<AD>(&device);
            reference.gamma = reference.gamma.map(|g| {
                Tensor::random([width], Distribution::Normal(1.0, 0.3), &device).require_grad()
                    + g.zeros_like()
            });
            let ours = crate::encoders::layers::LayerNorm::<AD> {
                gamma: reference.gamma.clone(),
                beta: reference.beta.clone().expect("beta"),
                epsilon: 1e-5,
            };
            let run = |y: Tensor<AD, 2>| {
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let get = |t: Option<Tensor<Flex, 2>>| {
                    t.expect("grad").into_data().to_vec::<f32>().expect("f32")
                };
                (
                    y.into_data().to_vec::<f32>().expect("f32"),
                    get(x.grad(&grads)),
                )
            };
            let (y_ref, dx_ref) = run(reference.forward(x.clone()));
            let (y_ours, dx_ours) = run(ours.forward(x.clone()));
            let max_diff =
                |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(max_diff(&y_ref, &y_ours) < 1e-5, "forward differs");
            assert!(
                max_diff(&dx_ref, &dx_ours) < 1e-4,
                "dx differs: {}",
                max_diff(&dx_ref, &dx_ours)
            );

            // Parameter gradients, and the decomposed default on the same inputs.
            let xs = x.clone().inner();
            let g = upstream.clone().inner();
            let gamma = reference.gamma.val().inner();
            let [_, dgamma, dbeta] = <Flex as SimMimBackend>::layer_norm_affine_backward(
                xs.clone().into_primitive().tensor(),
                gamma.clone().into_primitive().tensor(),
                g.clone().into_primitive().tensor(),
                1e-5,
            );
            let [dx_dec, dgamma_dec, dbeta_dec] = layer_norm_backward_decomposed::<Flex>(
                xs.into_primitive().tensor(),
                gamma.into_primitive().tensor(),
                g.into_primitive().tensor(),
                1e-5,
            );
            let vec = |t: FlexTensor| t.into_data().to_vec::<f32>().expect("f32");
            assert!(max_diff(&vec(dx_dec), &dx_ref) < 1e-4);
            let (dgamma, dgamma_dec) = (vec(dgamma), vec(dgamma_dec));
            let (dbeta, dbeta_dec) = (vec(dbeta), vec(dbeta_dec));
            let scale = dbeta_dec.iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(max_diff(&dgamma, &dgamma_dec) < 1e-4 * scale, "dgamma");
            assert!(max_diff(&dbeta, &dbeta_dec) < 1e-4 * scale, "dbeta");
        }
    }

    #[test]
    fn softmax_gradient_matches_burns_decomposition() {
        use burn::backend::Autodiff;
        use burn::tensor::{activation, Distribution};
        type AD = Autodiff<Flex>;
        let device = Default::default();
        for shape in [[3, 2, 5, 7], [512, 3, 16, 16]] {
            let x = Tensor::<AD, 4>::random(shape, Distribution::Normal(0.0, 3.0), &device)
                .require_grad();
            let upstream = Tensor::<AD, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let run = |y: Tensor<AD, 4>| {
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let dx = x.grad(&grads).expect("grad");
                (
                    y.into_data().to_vec::<f32>().expect("f32"),
                    dx.into_data().to_vec::<f32>().expect("f32"),
                )
            };
            let (y_ref, dx_ref) = run(activation::softmax(x.clone(), 3));
            let (y, dx) = run(crate::encoders::layers::softmax_last(x.clone()));
            let max_diff =
                |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(max_diff(&y, &y_ref) < 1e-6);
            assert!(max_diff(&dx, &dx_ref) < 1e-5, "{}", max_diff(&dx, &dx_ref));
        }
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
