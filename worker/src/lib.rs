//! A simmim-rs training node. `worker --coordinator URL` joins a run and executes the plan;
//! the library holds the pieces (data pipeline, schedule, train loop, checkpoints, pictures)
//! so tests and benchmarks can use them directly.

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod probe;
pub mod recon;
pub mod schedule;
pub mod session;
pub mod shutdown;
pub mod steps;
pub mod train;
pub mod weights_source;

/// Exit status for errors a restart cannot fix (invalid config, missing dataset); the
/// coordinator and Kubernetes' podFailurePolicy stop retrying on it.
pub const EXIT_DO_NOT_RETRY: i32 = 2;
