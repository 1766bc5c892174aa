//! Reading values off the device, and the digest that compares replicas. A value that cannot
//! be read off the device is an error, never zeros: zeros would train silently wrong weights
//! on every rank. (A step's gradients travel as `buckets`.)

pub mod buckets;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

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
