//! Mixed precision as `torch.autocast` does it: inside [`autocast`] with
//! [`Precision::Bf16`], every matmul of the model (linear layers, patch projection, attention,
//! the decoder) casts its operands to bf16 and its result back to f32; everything else
//! (LayerNorm, softmax, GELU, the loss) stays f32, and so do the weights, their gradients
//! (a cast's backward casts the gradient back) and AdamW's state.
//!
//! Like autocast, the setting is per thread and scoped: the step's sub-batch threads inherit
//! it from the thread that starts them (see `step`), and tests with different settings can
//! run side by side.

use std::cell::Cell;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
pub use simmim_proto::run_config::Precision;

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// The precision matmuls on this thread use now.
pub fn current() -> Precision {
    CURRENT.with(Cell::get)
}

/// Runs `f` with matmuls in `precision` on this thread, then restores the previous setting
/// (also when `f` panics).
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(precision)));
    f()
}

/// `lhs.matmul(rhs)` in the current precision; f32 in, f32 out.
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    match current() {
        Precision::Bf16 if lhs.dtype() == DType::F32 => lhs
            .cast(FloatDType::BF16)
            .matmul(rhs.cast(FloatDType::BF16))
            .cast(FloatDType::F32),
        _ => lhs.matmul(rhs),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::Flex;

    use super::*;

    type B = Autodiff<Flex>;

    #[test]
    fn bf16_matmul_rounds_the_operands_and_keeps_f32_gradients() {
        let device = Default::default();
        let x =
            Tensor::<B, 2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w =
            Tensor::<B, 2>::random([16, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let exact = matmul(x.clone(), w.clone());
        let mixed = autocast(Precision::Bf16, || matmul(x.clone(), w.clone()));
        assert_eq!(current(), Precision::F32, "the scope restores the setting");
        assert_eq!(mixed.dtype(), DType::F32);
        let gap: f32 = (mixed.clone() - exact.clone()).abs().max().into_scalar();
        let scale: f32 = exact.clone().abs().max().into_scalar();
        // bf16 keeps 8 bits of mantissa: products of 16 terms differ, but only by ~1%.
        assert!(gap > 0.0, "bf16 must actually round");
        assert!(gap < 0.02 * scale, "gap {gap} vs scale {scale}");
        let grads = mixed.sum().backward();
        let gw = w.grad(&grads).expect("weight gradient");
        assert_eq!(gw.dtype(), DType::F32);
        let gx = x.grad(&grads).expect("input gradient");
        assert_eq!(gx.dtype(), DType::F32);
    }
}

#[cfg(test)]
mod rounding {
    use burn::tensor::{FloatDType, Tensor, TensorData};
    use burn_flex::Flex;

    use super::*;

    fn tensor(values: &[f32], shape: [usize; 2]) -> Tensor<Flex, 2> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
    }

    fn values(t: Tensor<Flex, 2>) -> Vec<f32> {
        t.into_data().to_vec().expect("f32 values")
    }

    /// bf16 rounding must be to nearest: truncation biases every product the same way, and
    /// a bf16 run then drifts from f32 in one direction.
    #[test]
    fn casts_and_matmuls_round_to_nearest() {
        // 1.005 lies above the midpoint of bf16's 1.0 and 1.0078125; -1.005 mirrors it.
        let x = tensor(&[1.005, -1.005], [1, 2]);
        let cast = x.clone().cast(FloatDType::BF16).cast(FloatDType::F32);
        assert_eq!(values(cast), vec![1.0078125, -1.0078125], "cast");
        let identity = tensor(&[1.0, 0.0, 0.0, 1.0], [2, 2]);
        let product = autocast(Precision::Bf16, || matmul(x, identity));
        assert_eq!(values(product), vec![1.0078125, -1.0078125], "matmul");
        // A sum of bf16 products that needs rounding: 1 + 2 * 0.0029296875 = 1.005859375,
        // nearest bf16 1.0078125 (truncation would give 1.0).
        let (ones, terms) = (
            tensor(&[1.0, 1.0, 1.0], [1, 3]),
            tensor(&[1.0, 0.0029296875, 0.0029296875], [3, 1]),
        );
        let sum = autocast(Precision::Bf16, || matmul(ones, terms));
        assert_eq!(values(sum), vec![1.0078125], "rounded sum");
    }
}
