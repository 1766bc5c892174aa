//! The benches' `--kernel-cache`: the worker's kernel cache, with its compile progress on
//! stderr, so a cold first step reads as compiling rather than hanging.

use std::path::Path;
use std::time::Duration;

use simmim_model::backend::kernel_cache::{self, Watch};

/// Points cubecl's caches at `dir` (before the first CUDA tensor) and reports compiles every
/// 10 s while the returned watch lives; `None` keeps cubecl's own caches.
pub fn configure(dir: Option<&Path>) -> anyhow::Result<Option<Watch>> {
    let Some(dir) = dir else { return Ok(None) };
    let cache = kernel_cache::configure(dir)?;
    eprintln!("{}", cache.describe());
    Ok(cache.watch(Duration::from_secs(10), |p| {
        eprintln!(
            "compiling GPU kernels: {} so far in {:.0} s",
            p.kernels,
            p.elapsed.as_secs_f64()
        )
    }))
}
