use thiserror::Error;

/// Everything that can go wrong when building, loading or saving a SimMIM model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A configuration value is invalid; `field` names it the way the config file spells it.
    #[error("invalid model config: `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// The weights do not fit the model; every offending key is listed so a user can fix
    /// the whole checkpoint (or config) in one go rather than one key at a time.
    #[error("weights do not match the model:{}", format_mismatch(.missing, .unexpected, .wrong_shape))]
    WeightMismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
        wrong_shape: Vec<String>,
    },

    /// A buffer the official code stores (relative position index, attention mask) disagrees
    /// with the one derived from the config: the checkpoint was made for another geometry.
    #[error("buffer `{name}` in the weights disagrees with the model config ({reason})")]
    BufferMismatch { name: String, reason: String },

    #[error("cannot read weights from {path}: {reason}")]
    Read { path: String, reason: String },

    /// A tensor's values could not be read back from the device as `f32`.
    #[error("cannot read {name} off the device: {reason}")]
    DeviceRead { name: String, reason: String },

    #[error("cannot write weights to {path}: {reason}")]
    Write { path: String, reason: String },

    /// The GPU kernel cache directory cannot be used.
    #[error("GPU kernel cache {}: {reason}", .dir.display())]
    KernelCache {
        dir: std::path::PathBuf,
        reason: String,
    },
}

fn format_mismatch(missing: &[String], unexpected: &[String], wrong_shape: &[String]) -> String {
    let mut out = String::new();
    for (label, keys) in [
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong_shape),
    ] {
        if !keys.is_empty() {
            out.push_str(&format!(
                "\n  {label} ({}): {}",
                keys.len(),
                keys.join(", ")
            ));
        }
    }
    out
}

impl From<simmim_proto::ConfigError> for ModelError {
    fn from(e: simmim_proto::ConfigError) -> Self {
        ModelError::Config {
            field: e.field,
            reason: e.reason,
        }
    }
}
