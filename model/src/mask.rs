//! Mask geometry lives in `simmim-proto` so the coordinator can validate a config without
//! Burn; re-exported here for model users.

pub use simmim_proto::mask::*;
