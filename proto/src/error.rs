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

/// An error a restart cannot fix (an invalid config, a missing dataset, a refused token): the
/// process exits with [`EXIT_DO_NOT_RETRY`] so supervisors (the coordinator, Kubernetes'
/// podFailurePolicy) stop retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

impl Permanent {
    /// `e` as a permanent error, for `map_err`.
    pub fn from_display(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// Exit status for errors a restart cannot fix.
pub const EXIT_DO_NOT_RETRY: i32 = 2;
