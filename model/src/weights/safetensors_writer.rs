//! Writing safetensors into one buffer: the header first, with room reserved for the data,
//! then each tensor's bytes in header order, so a caller can release each tensor as soon as
//! it is written (see `snapshot`).

use crate::config::SimMimConfig;
use crate::error::ModelError;
use crate::weights::host::{HostTensor, CONFIG_METADATA_KEY};

/// One tensor's place in a safetensors file.
pub(crate) struct Entry {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn f32(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype: "F32",
            shape: shape.to_vec(),
        }
    }

    /// The entry of a host tensor already in memory.
    pub fn host(name: &str, tensor: &HostTensor) -> Self {
        Self {
            name: name.to_string(),
            dtype: match tensor {
                HostTensor::F32 { .. } => "F32",
                HostTensor::I64 { .. } => "I64",
            },
            shape: tensor.shape().to_vec(),
        }
    }

    fn bytes(&self) -> usize {
        let width = if self.dtype == "I64" { 8 } else { 4 };
        width * self.shape.iter().product::<usize>()
    }
}

/// A buffer holding the safetensors header for `entries` (data to follow in that order), with
/// room reserved for all of their data.
pub(crate) fn start_file(entries: &[Entry], config: &SimMimConfig) -> Result<Vec<u8>, ModelError> {
    let write_err = |reason: String| ModelError::Write {
        path: "<safetensors bytes>".into(),
        reason,
    };
    let mut header = serde_json::Map::new();
    let config_json = serde_json::to_string(config).map_err(|e| write_err(e.to_string()))?;
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ CONFIG_METADATA_KEY: config_json }),
    );
    let mut offset = 0usize;
    for entry in entries {
        let end = offset + entry.bytes();
        header.insert(
            entry.name.clone(),
            serde_json::json!({
                "dtype": entry.dtype,
                "shape": entry.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| write_err(e.to_string()))?;
    // The data starts 8-byte aligned, as the safetensors writer pads it.
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Appends values as little-endian `f32`; `transpose: Some((rows, cols))` writes a row-major
/// `[rows, cols]` (Burn's Linear layout) as the official `[cols, rows]`.
pub(crate) fn push_f32(out: &mut Vec<u8>, values: &[f32], transpose: Option<(usize, usize)>) {
    match transpose {
        Some((rows, cols)) => {
            for c in 0..cols {
                for r in 0..rows {
                    out.extend_from_slice(&values[r * cols + c].to_le_bytes());
                }
            }
        }
        None => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
    }
}

pub(crate) fn push_host(out: &mut Vec<u8>, tensor: &HostTensor) {
    match tensor {
        HostTensor::F32 { values, .. } => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        HostTensor::I64 { values, .. } => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
    }
}
