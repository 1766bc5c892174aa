//! The worker crate's integration tests, one module a file, in one binary (a binary per file
//! built and linked the worker's generic code once per file).

mod data;
mod trainer;
