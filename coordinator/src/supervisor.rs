//! Local worker processes: spawn them (like `torchrun --nproc-per-node`), log each to
//! `logs/worker-<i>.log` in the run directory, and notice when one exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub struct LocalWorkers {
    children: Vec<Child>,
    pub logs: Vec<PathBuf>,
}

/// A local worker ended: which one, and its exit status (None if killed by a signal).
#[derive(Debug)]
pub struct Exit {
    pub index: usize,
    pub code: Option<i32>,
}

/// The id local worker `index` registers under, in every generation.
pub fn worker_id(index: usize) -> String {
    format!("local-{index}")
}

/// The worker binary: `SIMMIM_WORKER_BIN`, or `worker` beside this executable.
pub fn worker_binary() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("SIMMIM_WORKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating the coordinator executable")?;
    let candidate = me.with_file_name("worker");
    if candidate.exists() {
        Ok(candidate)
    } else {
        anyhow::bail!(
            "no worker binary at {}; build it (cargo build --release -p simmim-worker) or set SIMMIM_WORKER_BIN",
            candidate.display()
        )
    }
}

impl LocalWorkers {
    pub fn spawn(
        count: usize,
        coordinator_url: &str,
        device: &str,
        log_dir: &Path,
        token: &str,
    ) -> Result<Self> {
        let binary = worker_binary()?;
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for index in 0..count {
            let log = log_dir.join(format!("worker-{index}.log"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            let err = file.try_clone()?;
            let device = if device == "cuda" {
                format!("cuda:{index}")
            } else {
                device.to_string()
            };
            let mut command = Command::new(&binary);
            // mimalloc returning freed pages to the OS at once costs the step ~10% (measured
            // in the step benchmark); keep them unless the user says otherwise.
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                command.env("MIMALLOC_PURGE_DELAY", "-1");
            }
            let child = command
                .arg("--coordinator")
                .arg(coordinator_url)
                .arg("--device")
                .arg(&device)
                .env("SIMMIM_WORKER_ID", worker_id(index))
                .env(simmim_proto::auth::TOKEN_ENV, token)
                .env_remove(simmim_proto::auth::TOKEN_FILE_ENV)
                .stdin(Stdio::null())
                .stdout(Stdio::from(file))
                .stderr(Stdio::from(err))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            children.push(child);
            logs.push(log);
        }
        Ok(Self { children, logs })
    }

    /// Watches every child; exits arrive on the returned channel.
    pub fn watch(&mut self) -> mpsc::UnboundedReceiver<Exit> {
        let (tx, rx) = mpsc::unbounded_channel();
        for (index, mut child) in std::mem::take(&mut self.children).into_iter().enumerate() {
            let tx = tx.clone();
            let pid = child.id();
            tokio::spawn(async move {
                let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
                KILLERS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(kill_tx);
                tokio::select! {
                    status = child.wait() => {
                        let code = status.ok().and_then(|s| s.code());
                        let _ = tx.send(Exit { index, code });
                    }
                    _ = kill_rx => {
                        let _ = child.kill().await;
                        tracing::debug!(?pid, "local worker killed");
                    }
                }
            });
        }
        rx
    }
}

static KILLERS: std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Kills every local worker still running.
pub fn kill_all() {
    let killers = std::mem::take(&mut *KILLERS.lock().unwrap_or_else(|p| p.into_inner()));
    for k in killers {
        let _ = k.send(());
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
