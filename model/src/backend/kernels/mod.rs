//! The CPU kernels: plain loops over f32 slices that the compiler vectorises, split across the
//! machine's cores with rayon.

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod layer_norm;
pub(crate) mod math;
pub(crate) mod rows;
