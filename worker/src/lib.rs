//! A simmim-rs training node. `worker --coordinator URL` joins a run and executes the plan;
//! the library holds the pieces (data pipeline, the trainer and its tasks, checkpoints,
//! the coordinator client, the subcommands) so tests and benchmarks can use them directly.

pub mod checkpoint;
pub mod collective;
pub mod commands;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod generation;
pub mod gpu_kernels;
pub mod host;
pub mod probe;
pub mod recon;
pub mod schedule;
pub mod session;
pub mod shutdown;
pub mod trainer;
pub mod user_mask;
pub mod weights_source;
