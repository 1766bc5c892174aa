//! The attention core shared by Swin's window attention and ViT's global attention:
//! `softmax(scale * q kᵀ + bias) v` per head, with the heads merged back into channels.
//!
//! Written as Burn ops, attention splits the fused qkv projection into heads (a strided
//! copy), adds the bias to the large logits tensor by broadcast (strided again), and merges
//! the heads after the second matmul (another copy); backward repeats each copy. On the CPU
//! those copies were about a sixth of the step. A backend with its own kernel
//! ([`SimMimBackend::has_attention_kernel`]) reads q, k and v in place from the projection's rows,
//! writes the merged output directly and returns the gradient of the whole projection in one
//! buffer. The functions here are the same math in Burn ops: the trait's default for other
//! backends and the reference the kernel is tested against.

use burn::tensor::{Tensor, TensorPrimitive};

use crate::backend::decomposed::attention_forward;
use crate::backend::precision::{self, Precision};
use crate::backend::SimMimBackend;

/// Attention over `qkv`: `[G, N, 3C]`, the fused projection's output for `G` groups (windows
/// or images) of `N` tokens, q, k and v as consecutive blocks of `C` channels, each split
/// into `heads`. `bias`: `[P, heads, N, N]`; group `g` uses `bias[g % P]` (Swin's `P`
/// windows per image, each with its own shift mask; 1 for a bias shared by all). Returns
/// `[G, N, C]`. Through the backend's kernel where it has one and matmuls run in f32, else
/// as Burn ops that autodiff differentiates.
pub fn attention<B: SimMimBackend>(
    qkv: Tensor<B, 3>,
    bias: Tensor<B, 4>,
    heads: usize,
    scale: f64,
) -> Tensor<B, 3> {
    if use_fused::<B>() {
        let out = B::qkv_attention(
            qkv.into_primitive().tensor(),
            bias.into_primitive().tensor(),
            heads,
            scale,
        );
        return Tensor::from_primitive(TensorPrimitive::Float(out));
    }
    attention_forward(qkv, bias, heads, scale).0
}

/// Whether the model should hand attention to [`attention`] with one fused qkv projection.
/// Elsewhere (GPU backends, bf16 autocast) the encoders keep their per-part projections,
/// which autodiff and kernel fusion handle well.
pub fn use_fused<B: SimMimBackend>() -> bool {
    B::has_attention_kernel() && precision::current() == Precision::F32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::decomposed::attention_backward;
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    type AD = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().expect("f32")
    }

    /// Largest difference relative to the reference's largest magnitude.
    fn relative_gap(ours: &[f32], reference: &[f32]) -> f32 {
        assert_eq!(ours.len(), reference.len());
        let scale = reference.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        ours.iter()
            .zip(reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    /// (groups, tokens, channels, heads, bias groups): Swin windows with per-window shift
    /// masks, a ViT-like odd token count with one shared bias, and an uneven split of
    /// groups over threads.
    const SHAPES: [(usize, usize, usize, usize, usize); 3] =
        [(8, 16, 32, 2, 4), (2, 17, 48, 3, 1), (37, 9, 24, 4, 1)];

    /// The kernel's output and gradients against autodiff through Burn's decomposition.
    #[test]
    fn kernel_matches_burns_decomposition() {
        assert!(<AD as SimMimBackend>::has_attention_kernel());
        let device = Default::default();
        for (groups, tokens, dim, heads, bias_groups) in SHAPES {
            let scale = ((dim / heads) as f64).powf(-0.5);
            // The kernel takes this shape (a refused one would fall back to the very
            // decomposition it is compared with).
            let lengths = crate::backend::kernels::attention::Lengths {
                qkv: groups * tokens * 3 * dim,
                bias: Some(bias_groups * heads * tokens * tokens),
                probs: Some(groups * heads * tokens * tokens),
                out: Some(groups * tokens * dim),
            };
            let dims = [groups, tokens, 3 * dim];
            assert!(crate::backend::kernels::attention::Shape::of(
                &dims,
                heads,
                bias_groups,
                lengths
            )
            .is_some());
            let qkv = Tensor::<AD, 3>::random(
                [groups, tokens, 3 * dim],
                Distribution::Normal(0.0, 1.5),
                &device,
            )
            .require_grad();
            // A shift-mask-like bias: some entries -100, the rest small.
            let mask = Tensor::<AD, 4>::random(
                [bias_groups, 1, tokens, tokens],
                Distribution::Bernoulli(0.2),
                &device,
            )
            .mul_scalar(-100.0);
            let bias = (Tensor::<AD, 4>::random(
                [bias_groups, heads, tokens, tokens],
                Distribution::Normal(0.0, 0.5),
                &device,
            ) + mask)
                .detach()
                .require_grad();
            let upstream = Tensor::<AD, 3>::random(
                [groups, tokens, dim],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |out: Tensor<AD, 3>| {
                let grads = (out.clone() * upstream.clone()).sum().backward();
                (
                    values(out.inner()),
                    values(qkv.grad(&grads).expect("qkv grad")),
                    values(bias.grad(&grads).expect("bias grad")),
                )
            };
            let (out, d_qkv, d_bias) = run(attention(qkv.clone(), bias.clone(), heads, scale));
            let (out_ref, d_qkv_ref, d_bias_ref) =
                run(attention_forward(qkv.clone(), bias.clone(), heads, scale).0);
            let shape = (groups, tokens, dim, heads, bias_groups);
            assert!(relative_gap(&out, &out_ref) < 1e-5, "output {shape:?}");
            assert!(relative_gap(&d_qkv, &d_qkv_ref) < 1e-5, "d_qkv {shape:?}");
            assert!(
                relative_gap(&d_bias, &d_bias_ref) < 1e-5,
                "d_bias {shape:?}"
            );
            // Not a vacuous comparison: the gradients are far from zero.
            assert!(d_bias_ref.iter().any(|v| v.abs() > 1e-3));

            // The Burn-ops backward (the default for backends without a kernel) agrees too.
            let (_, probs) =
                attention_forward(qkv.clone().inner(), bias.clone().inner(), heads, scale);
            let (d_qkv_dec, d_bias_dec) = attention_backward(
                qkv.clone().inner(),
                probs,
                upstream.clone().inner(),
                bias_groups,
                scale,
            );
            assert!(
                relative_gap(&values(d_qkv_dec), &d_qkv_ref) < 1e-5,
                "{shape:?}"
            );
            assert!(
                relative_gap(&values(d_bias_dec), &d_bias_ref) < 1e-5,
                "{shape:?}"
            );
        }
    }

    /// Under bf16 autocast the model keeps Burn's ops, so attention matmuls round as
    /// `crate::backend::precision` says; the kernel is f32 only.
    #[test]
    fn autocast_bypasses_the_kernel() {
        assert!(use_fused::<Flex>());
        crate::backend::precision::autocast(Precision::Bf16, || assert!(!use_fused::<Flex>()));
    }
}
