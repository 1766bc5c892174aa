//! The model configuration lives in `simmim-proto` (it is part of the run-config contract the
//! coordinator validates without linking Burn); re-exported here for model users.

pub use simmim_proto::model_config::*;
