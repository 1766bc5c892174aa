//! The worker's subcommands, one module each; `main.rs` only parses and dispatches.

pub mod inspect;
pub mod join;
pub mod launch;
pub mod mask_stats;
pub mod plan_memory;
pub mod probe;
