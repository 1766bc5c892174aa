//! The contract between simmim-rs processes: the gRPC service (`pb`), the run config and its
//! validation, the model config, the checkpoint manifest and the data plan. Nothing here
//! depends on Burn, so the coordinator can validate and plan a run without linking it.

pub mod error;
pub mod manifest;
pub mod mask;
pub mod model_config;
pub mod plan;
pub mod run_config;
pub mod status;

pub use error::{ConfigError, Permanent, EXIT_DO_NOT_RETRY};
pub use manifest::{Manifest, ManifestFile};
pub use plan::{Cursor, DataPlan};
pub use run_config::RunConfig;
pub use status::RunStatus;

#[cfg(feature = "grpc")]
pub mod auth;
#[cfg(feature = "grpc")]
pub mod logging;

/// Generated gRPC messages and service stubs (`proto/simmim.proto`).
#[cfg(feature = "grpc")]
pub mod pb {
    tonic::include_proto!("simmim.v1");
}

#[cfg(feature = "store")]
pub mod checkpoint;
#[cfg(feature = "store")]
pub mod store;

/// The registration's resume point is a committed checkpoint.
#[cfg(all(feature = "grpc", feature = "store"))]
impl From<checkpoint::Committed> for pb::ResumePoint {
    fn from(c: checkpoint::Committed) -> Self {
        Self {
            step: c.step,
            manifest: c.manifest,
        }
    }
}
