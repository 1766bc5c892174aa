//! Gradients as one flat host buffer, in the module's parameter order, so every rank lays
//! them out identically; a parameter without a gradient contributes zeros.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

/// Every parameter's gradient, concatenated (row-major), in visiting order.
pub fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<f32> {
    struct Flattener<'a> {
        grads: &'a GradientsParams,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flattener<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            match self.grads.get::<B::InnerBackend, D>(param.id) {
                Some(grad) => match grad.into_data().convert::<f32>().to_vec::<f32>() {
                    Ok(values) => self.out.extend_from_slice(&values),
                    Err(_) => self
                        .out
                        .extend(std::iter::repeat_n(0.0, param.shape().num_elements())),
                },
                None => self
                    .out
                    .extend(std::iter::repeat_n(0.0, param.shape().num_elements())),
            }
        }
    }
    let mut visitor = Flattener {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// The inverse of [`flatten`]: a gradient for every parameter, from `values`.
pub fn unflatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    values: &[f32],
    device: &B::Device,
) -> GradientsParams {
    struct Builder<'a, B: AutodiffBackend> {
        values: &'a [f32],
        at: usize,
        device: &'a B::Device,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Builder<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.shape();
            let n = shape.num_elements();
            let data = TensorData::new(self.values[self.at..self.at + n].to_vec(), shape);
            self.at += n;
            let grad = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
            self.out.register(param.id, grad);
        }
    }
    let mut builder = Builder::<B> {
        values,
        at: 0,
        device,
        out: GradientsParams::new(),
    };
    module.visit(&mut builder);
    builder.out
}

/// A digest of every weight's bits (order-sensitive), to compare replicas.
pub fn weights_digest<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> u64 {
    struct Digest {
        state: u64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Digest {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Ok(values) = param.val().into_data().convert::<f32>().to_vec::<f32>() {
                for v in values {
                    self.state = simmim_proto::plan::mix(self.state, u64::from(v.to_bits()));
                }
            }
        }
    }
    let mut digest = Digest { state: 0 };
    module.visit(&mut digest);
    digest.state
}
