//! A GPU worker's kernel cache and its compile progress, set up once per process before the
//! first CUDA tensor (see `simmim_model::backend::kernel_cache` for why both matter).

use std::path::Path;

use anyhow::Result;

/// How often compile progress is logged while kernels are being compiled.
#[cfg(feature = "cuda")]
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps the compile-progress reports going while it lives.
#[cfg(feature = "cuda")]
pub type Compiling = simmim_model::backend::kernel_cache::Watch;
#[cfg(not(feature = "cuda"))]
pub type Compiling = ();

/// Points cubecl's caches at `dir` and starts logging compile progress.
#[cfg(feature = "cuda")]
pub fn prepare(dir: &Path) -> Result<Option<Compiling>> {
    use simmim_model::backend::kernel_cache;
    let cache = match kernel_cache::configure(dir) {
        Ok(cache) => cache,
        Err(e) => {
            // Training still works without the cache, only every start compiles again.
            tracing::warn!("{e}; GPU kernels will be compiled again by every worker start");
            return Ok(None);
        }
    };
    tracing::info!("{}", cache.describe());
    Ok(cache.watch(PROGRESS_EVERY, |p| {
        tracing::info!(
            "compiling GPU kernels: {} so far in {:.0} s (once per kernel cache; the GPU idles meanwhile)",
            p.kernels,
            p.elapsed.as_secs_f64()
        );
    }))
}

/// Without the `cuda` feature there is nothing to prepare (training on cuda fails later with
/// a clear error).
#[cfg(not(feature = "cuda"))]
pub fn prepare(_dir: &Path) -> Result<Option<Compiling>> {
    Ok(None)
}
