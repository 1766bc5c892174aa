//! A module's gradients as one flat `f32` buffer, in the module's parameter order, so every
//! rank lays them out identically and a transport sees only `&mut [f32]`; and the way back.
//! A value that cannot be read off the device is an error, never zeros: zeros would train
//! silently wrong weights on every rank.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::naming::PathTracker;
use crate::ModelError;

/// Reads a tensor's values as `f32`; `what` names it in the error.
pub fn host_values(
    data: TensorData,
    what: impl FnOnce() -> String,
) -> Result<Vec<f32>, ModelError> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ModelError::DeviceRead {
            name: what(),
            reason: format!("{e:?}"),
        })
}

/// Every parameter's gradient, concatenated (row-major), in visiting order. A parameter
/// without a gradient (unused in this step's graph) contributes zeros: it has none to add.
pub fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Result<Vec<f32>, ModelError> {
    struct Flattener<'a> {
        tracker: PathTracker,
        grads: &'a GradientsParams,
        out: Vec<f32>,
        error: Option<ModelError>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flattener<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.tracker.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.error.is_some() {
                return;
            }
            let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) else {
                let n = param.shape().num_elements();
                self.out.extend(std::iter::repeat_n(0.0, n));
                return;
            };
            let tracker = &self.tracker;
            match host_values(grad.into_data(), || {
                format!("the gradient of {}", tracker.official().name)
            }) {
                Ok(values) => self.out.extend_from_slice(&values),
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut visitor = Flattener {
        tracker: PathTracker::default(),
        grads,
        out: Vec::new(),
        error: None,
    };
    module.visit(&mut visitor);
    match visitor.error {
        Some(e) => Err(e),
        None => Ok(visitor.out),
    }
}

/// The number of values [`flatten`] produces for `module`.
pub fn flat_len<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> usize {
    struct Counter(usize);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Counter {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.shape().num_elements();
        }
    }
    let mut counter = Counter(0);
    module.visit(&mut counter);
    counter.0
}

/// The inverse of [`flatten`]: a gradient for every parameter, from `values` (which must be
/// exactly [`flat_len`] long).
pub fn unflatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    values: &[f32],
    device: &B::Device,
) -> Result<GradientsParams, ModelError> {
    let expected = flat_len::<B, M>(module);
    if values.len() != expected {
        return Err(ModelError::DeviceRead {
            name: "the reduced gradient buffer".into(),
            reason: format!(
                "{} values for a model of {expected} parameters",
                values.len()
            ),
        });
    }
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
    Ok(builder.out)
}

/// A digest of every weight's bits (order-sensitive), to compare replicas.
pub fn weights_digest<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
) -> Result<u64, ModelError> {
    struct Digest {
        state: u64,
        error: Option<ModelError>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Digest {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.error.is_some() {
                return;
            }
            match host_values(param.val().into_data(), || "a weight".into()) {
                Ok(values) => {
                    for v in values {
                        self.state = simmim_proto::plan::mix(self.state, u64::from(v.to_bits()));
                    }
                }
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut digest = Digest {
        state: 0,
        error: None,
    };
    module.visit(&mut digest);
    match digest.error {
        Some(e) => Err(e),
        None => Ok(digest.state),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::module::Module;
    use burn_flex::Flex;

    use super::*;
    use crate::{InitModel, SimMimConfig};

    type B = Autodiff<Flex>;

    #[test]
    fn unflatten_refuses_a_buffer_of_the_wrong_length() {
        let config = SimMimConfig::preset("swin_micro").expect("preset");
        let model = config.init::<B>(0, &Default::default()).expect("model");
        let n = flat_len::<B, _>(&model);
        assert!(n > 0);
        assert_eq!(model.num_params(), n);
        let short = vec![0.0; n - 1];
        let err = unflatten::<B, _>(&model, &short, &Default::default())
            .expect_err("a short buffer must be refused");
        assert!(
            err.to_string().contains(&format!("{} values", n - 1)),
            "{err}"
        );
        let grads = unflatten::<B, _>(&model, &vec![0.5; n], &Default::default()).expect("fits");
        let flat = flatten::<B, _>(&model, &grads).expect("flatten");
        assert_eq!(flat.len(), n);
        assert!(flat.iter().all(|&v| v == 0.5));
    }
}
