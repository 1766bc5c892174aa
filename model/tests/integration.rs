//! The model crate's integration tests, one module a file, in one binary: a binary per file
//! built and linked the model's generic code once per file (about 15 s each on 2 cores).

mod common;
mod finetune;
mod optimizer_state;
mod parity;
mod precision;
mod sharded_step;
mod snapshot;
mod weights;
