use thiserror::Error;

/// A configuration value is invalid. `field` is spelled the way the YAML file spells it
/// (`train.base_lr`, `model.encoder.depths`), so the user knows which line to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid config: `{field}`: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    /// The same error seen from an enclosing section: `encoder.depths` inside `model`
    /// becomes `model.encoder.depths`.
    pub fn within(mut self, section: &str) -> Self {
        self.field = format!("{section}.{}", self.field);
        self
    }
}

pub fn config_error(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}
