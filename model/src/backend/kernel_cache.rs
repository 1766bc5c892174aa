//! Where burn-cuda keeps what it compiles, and how a waiting user sees it compile.
//!
//! burn-cuda compiles every kernel at its first launch (NVRTC, on one thread) and, with
//! autotune, compiles and times several candidates for every new matmul shape. A cold process
//! spends minutes on this with the GPU idle and nothing printed, which looks like a hang.
//! cubecl can keep both results on disk, but by default the compiled kernels are not kept and
//! the autotune results land in `target/` of the nearest Cargo.toml, which a container has
//! not. [`configure`] points both at one directory the operator chooses (a volume that
//! outlives the pod, so a restarted worker does not recompile), and [`KernelCache::watch`]
//! reports how many kernels have been compiled while it goes on.
//!
//! A `cubecl.toml` (or `burn.toml` with a `[cubecl]` section) in the working directory or
//! above it is the user's own configuration and wins: then nothing is set here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

use crate::ModelError;

/// The configuration files cubecl reads on its own, nearest first.
const USER_CONFIG_FILES: [&str; 4] = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"];

/// The kernel cache this process uses.
#[derive(Debug, Clone)]
pub struct KernelCache {
    /// The directory holding compiled kernels and autotune results.
    pub dir: Option<PathBuf>,
    /// The user's configuration file, when one overrides ours.
    pub user_config: Option<PathBuf>,
    compile_log: Option<PathBuf>,
}

/// How far compilation has come since [`KernelCache::watch`] started.
#[derive(Debug, Clone, Copy)]
pub struct CompileProgress {
    pub kernels: usize,
    pub elapsed: Duration,
}

/// A running progress report; it stops when dropped.
pub struct Watch {
    stop: Arc<AtomicBool>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The user's cubecl configuration file, searched as cubecl does (the working directory, then
/// its parents).
pub fn user_config_file() -> Option<PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        for name in USER_CONFIG_FILES {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
        if !dir.pop() {
            return None;
        }
    }
}

/// Keeps compiled kernels and autotune results in `dir` and logs each compilation to
/// `dir/compile.log`. Must run before the first CUDA tensor is made: cubecl reads its
/// configuration once per process.
pub fn configure(dir: &Path) -> Result<KernelCache, ModelError> {
    if let Some(file) = user_config_file() {
        return Ok(KernelCache {
            dir: None,
            user_config: Some(file),
            compile_log: None,
        });
    }
    let failed = |reason: String| ModelError::KernelCache {
        dir: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("cannot create it: {e}")))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| failed(format!("cannot resolve it: {e}")))?;
    let compile_log = dir.join("compile.log");
    let config: CubeClRuntimeConfig = serde_json::from_value(serde_json::json!({
        "compilation": {
            "cache": { "file": dir },
            "logger": { "level": "basic", "file": compile_log, "append": true },
        },
        "autotune": {
            "cache": { "file": dir },
        },
    }))
    .map_err(|e| failed(format!("cubecl refused the configuration: {e}")))?;
    // CUBECL_* variables still apply on top, as they do to a cubecl.toml.
    let config = config.override_from_env();
    // `set` panics when cubecl has already read its configuration (a CUDA tensor exists).
    std::panic::catch_unwind(|| CubeClRuntimeConfig::set(config)).map_err(|_| {
        failed("cubecl was configured already: set the cache before the first CUDA tensor".into())
    })?;
    Ok(KernelCache {
        dir: Some(dir),
        user_config: None,
        compile_log: Some(compile_log),
    })
}

impl KernelCache {
    /// Calls `report` every `every` while kernels are being compiled (and not while none
    /// are), until the returned [`Watch`] is dropped.
    pub fn watch(
        &self,
        every: Duration,
        report: impl Fn(CompileProgress) + Send + 'static,
    ) -> Option<Watch> {
        let log = self.compile_log.clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let started = Instant::now();
        let lines = move || {
            std::fs::read(&log)
                .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
                .unwrap_or(0)
        };
        let before = lines();
        std::thread::Builder::new()
            .name("kernel-progress".into())
            .spawn(move || {
                let mut reported = 0;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let kernels = lines().saturating_sub(before);
                    if kernels > reported && !stopped.load(Ordering::Relaxed) {
                        reported = kernels;
                        report(CompileProgress {
                            kernels,
                            elapsed: started.elapsed(),
                        });
                    }
                }
            })
            .ok()?;
        Some(Watch { stop })
    }

    /// One line for the log: where the kernels are kept.
    pub fn describe(&self) -> String {
        match (&self.dir, &self.user_config) {
            (_, Some(file)) => format!("GPU kernel caches as configured in {}", file.display()),
            (Some(dir), None) => format!(
                "GPU kernels and autotune results cached in {} (a warm cache skips compiling)",
                dir.display()
            ),
            (None, None) => "GPU kernels are not cached".into(),
        }
    }
}
