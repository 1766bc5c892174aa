//! The whole-system tests, one module a file, in one binary: a binary per file linked the
//! same helpers and clients eight times over.

mod containers;
mod deploy;
mod distributed;
mod finetune;
mod multihost;
mod observability;
mod pretrain;
mod s3;
mod zero;
