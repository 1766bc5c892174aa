//! The CPU kernel behind [`crate::backend::SimMimBackend::adamw_update`] on burn-flex: one
//! pass over each parameter instead of a dozen whole-tensor ops (burn-flex runs each
//! element-wise op on one thread, with a fresh buffer), spread over rayon's threads. The
//! arithmetic is the decomposition's, in the same order and precision.

use rayon::prelude::*;

use crate::backend::AdamWUpdate;

/// Values per parallel task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 15;

/// `[value, first, second]` after one update, or `None` when the lengths differ.
pub fn adamw(
    value: &[f32],
    grad: &[f32],
    moments: Option<(&[f32], &[f32])>,
    u: &AdamWUpdate,
) -> Option<[Vec<f32>; 3]> {
    let len = value.len();
    if grad.len() != len || moments.is_some_and(|(m, v)| m.len() != len || v.len() != len) {
        return None;
    }
    // Each scalar as Burn's `mul_scalar` etc. take it: computed in f64, applied as f32.
    let grad_scale = u.grad_scale as f32;
    let (beta1, one_minus_beta1) = (u.beta1 as f32, (1.0 - u.beta1) as f32);
    let (beta2, one_minus_beta2) = (u.beta2 as f32, (1.0 - u.beta2) as f32);
    let decay_factor = u.decay_factor as f32;
    let step_size = u.step_size as f32;
    let bias_correction2_sqrt = u.bias_correction2_sqrt as f32;
    let eps = u.eps as f32;

    // Written once each, so not zeroed first: zeroing is one more pass over three times the
    // parameters' bytes, on the allocating thread alone.
    let mut out: [Vec<f32>; 3] = std::array::from_fn(|_| Vec::with_capacity(len));
    let [new_value, new_first, new_second] =
        out.each_mut().map(|v| &mut v.spare_capacity_mut()[..len]);
    new_value
        .par_chunks_mut(CHUNK)
        .zip(new_first.par_chunks_mut(CHUNK))
        .zip(new_second.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(chunk, ((w_out, m_out), v_out))| {
            let start = chunk * CHUNK;
            let end = start + w_out.len();
            let (w_in, g_in) = (&value[start..end], &grad[start..end]);
            let old = moments.map(|(m, v)| (&m[start..end], &v[start..end]));
            for i in 0..w_out.len() {
                let mut g = g_in[i];
                if grad_scale != 1.0 {
                    g *= grad_scale;
                }
                let (m, v) = match old {
                    Some((m, v)) => (
                        m[i] * beta1 + g * one_minus_beta1,
                        v[i] * beta2 + (g * g) * one_minus_beta2,
                    ),
                    None => (g * one_minus_beta1, (g * g) * one_minus_beta2),
                };
                let mut w = w_in[i];
                if decay_factor != 1.0 {
                    w *= decay_factor;
                }
                let denominator = v.sqrt() / bias_correction2_sqrt + eps;
                w_out[i].write(w - (m / denominator) * step_size);
                m_out[i].write(m);
                v_out[i].write(v);
            }
        });
    for values in &mut out {
        // SAFETY: the chunks above cover `0..len` of every output and write each value once;
        // a panic there propagates before this line.
        unsafe { values.set_len(len) };
    }
    Some(out)
}

/// `sum_i weights[i] * parts[i]` in one pass on all cores, accumulated left to right in f32
/// as [`crate::backend::weighted_sum_decomposed`] does (the same bits); `None` when the parts
/// are missing, differ in length or do not match the weights.
pub fn weighted_sum(parts: &[&[f32]], weights: &[f64]) -> Option<Vec<f32>> {
    let (first, rest) = parts.split_first()?;
    if parts.len() != weights.len() || rest.iter().any(|p| p.len() != first.len()) {
        return None;
    }
    // Each weight as Burn's `mul_scalar` takes it: applied as f32.
    let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut out = Vec::with_capacity(first.len());
    (0..first.len())
        .into_par_iter()
        .with_min_len(CHUNK)
        .map(|i| {
            let mut total = first[i] * weights[0];
            for (part, &w) in rest.iter().zip(&weights[1..]) {
                total += part[i] * w;
            }
            total
        })
        .collect_into_vec(&mut out);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::decomposed::adamw_update_decomposed;
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::Flex;

    /// The kernel against the Burn-ops decomposition over a few steps, with clipping and
    /// decay, on a length that leaves a partial chunk: the same values to the last bit,
    /// since both apply the same f32 operations in the same order.
    #[test]
    fn kernel_matches_the_decomposition() {
        let device = Default::default();
        let len = 2 * CHUNK + 123;
        let random = |std: f64| {
            Tensor::<Flex, 1>::random([len], Distribution::Normal(0.0, std), &device)
                .into_data()
                .to_vec::<f32>()
                .expect("f32")
        };
        let mut value = random(1.0);
        let mut moments: Option<(Vec<f32>, Vec<f32>)> = None;
        let mut reference = (value.clone(), None::<(Vec<f32>, Vec<f32>)>);
        for t in 1..=3 {
            let grad = random(0.1);
            let u = AdamWUpdate {
                grad_scale: if t == 2 { 0.5 } else { 1.0 },
                beta1: 0.9,
                beta2: 0.999,
                decay_factor: 1.0 - 1e-3 * 0.05,
                step_size: 1e-3 / (1.0 - 0.9f64.powi(t)),
                bias_correction2_sqrt: (1.0 - 0.999f64.powi(t)).sqrt(),
                eps: 1e-8,
            };
            let [w, m, v] = adamw(
                &value,
                &grad,
                moments.as_ref().map(|(m, v)| (m.as_slice(), v.as_slice())),
                &u,
            )
            .expect("lengths match");

            let tensor = |values: &[f32]| {
                Tensor::<Flex, 1>::from_floats(values, &device)
                    .into_primitive()
                    .tensor()
            };
            let old = reference.1.as_ref().map(|(m, v)| (tensor(m), tensor(v)));
            let [rw, rm, rv] =
                adamw_update_decomposed::<Flex>(tensor(&reference.0), tensor(&grad), old, &u).map(
                    |t| {
                        Tensor::<Flex, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(t))
                            .into_data()
                            .to_vec::<f32>()
                            .expect("f32")
                    },
                );
            assert_eq!(w, rw, "value after step {t}");
            assert_eq!(m, rm, "first moment after step {t}");
            assert_eq!(v, rv, "second moment after step {t}");
            assert!(
                w.iter().zip(&value).any(|(a, b)| a != b),
                "the step moved nothing"
            );
            value = w;
            moments = Some((m, v));
            reference = (rw, Some((rm, rv)));
        }
        assert!(adamw(
            &value,
            &value[1..],
            None,
            &AdamWUpdate {
                grad_scale: 1.0,
                beta1: 0.9,
                beta2: 0.999,
                decay_factor: 1.0,
                step_size: 1e-3,
                bias_correction2_sqrt: 1.0,
                eps: 1e-8,
            }
        )
        .is_none());
    }

    /// The summing kernel against Burn's ops on four parts of a rank-2 shape whose length
    /// leaves a partial chunk, through the backend op the gradient sums call: the same
    /// bits, and the sum is the weighted sum (checked against f64 on a few values).
    #[test]
    fn weighted_sum_matches_the_decomposition() {
        use crate::backend::decomposed::weighted_sum_decomposed;
        use crate::backend::SimMimBackend;
        let device = Default::default();
        let shape = [3, CHUNK - 7];
        let weights = [0.125, 0.3, 0.2, 0.375];
        let parts: Vec<Tensor<Flex, 2>> = (0..weights.len())
            .map(|_| Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device))
            .collect();
        let primitives = || -> Vec<_> {
            parts
                .iter()
                .map(|t| t.clone().into_primitive().tensor())
                .collect()
        };
        let values = |t| {
            crate::backend::float::<Flex, 2>(t)
                .into_data()
                .to_vec::<f32>()
                .expect("f32")
        };
        let kernel = Flex::weighted_sum(primitives(), &weights).expect("parts");
        let reference = weighted_sum_decomposed::<Flex>(primitives(), &weights).expect("parts");
        let (kernel, reference) = (values(kernel), values(reference));
        assert_eq!(kernel, reference);
        let inputs: Vec<Vec<f32>> = parts
            .iter()
            .map(|t| t.clone().into_data().to_vec::<f32>().expect("f32"))
            .collect();
        for i in [0, CHUNK, kernel.len() - 1] {
            let exact: f64 = inputs
                .iter()
                .zip(weights)
                .map(|(p, w)| p[i] as f64 * w)
                .sum();
            assert!((kernel[i] as f64 - exact).abs() < 1e-5, "value {i}");
        }
        assert!(weighted_sum(&[&inputs[0], &inputs[1][1..]], &weights[..2]).is_none());
        assert!(weighted_sum(&[&inputs[0]], &weights).is_none());
        assert!(Flex::weighted_sum(Vec::new(), &[]).is_none());
    }
}
