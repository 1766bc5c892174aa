//! Tensors as files hold them: on the host, under their official names.

use std::collections::BTreeMap;

/// A tensor read from a file, on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    F32 { shape: Vec<usize>, values: Vec<f32> },
    I64 { shape: Vec<usize>, values: Vec<i64> },
}

impl HostTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32 { shape, .. } | Self::I64 { shape, .. } => shape,
        }
    }

    pub(crate) fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Self::F32 { values, .. } => Some(values),
            Self::I64 { .. } => None,
        }
    }
}

/// Named tensors as a checkpoint holds them.
pub type StateDict = BTreeMap<String, HostTensor>;

/// Metadata key under which exported safetensors carry the model config (JSON), so a file
/// is enough to rebuild its model.
pub const CONFIG_METADATA_KEY: &str = "simmim_config";
