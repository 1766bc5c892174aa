//! `worker finetune --config F`: runs `coordinator start` (beside this binary) on a run
//! config with a `finetune:` section, so fine-tuning is distributed and resumable like
//! pretraining.

use std::path::Path;

use anyhow::{bail, Context, Result};

pub fn finetune_via_coordinator(config: &Path, args: &[String]) -> Result<()> {
    let me = std::env::current_exe().context("locating the worker executable")?;
    let coordinator = me.with_file_name("coordinator");
    if !coordinator.is_file() {
        bail!(
            "no coordinator binary at {}; build it (cargo build --release -p simmim-coordinator)",
            coordinator.display()
        );
    }
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let parsed = simmim_proto::RunConfig::from_yaml(&text, &config.display().to_string())?;
    if parsed.finetune.is_none() {
        bail!(
            "{}: no `finetune:` section; this is a pretraining config (use coordinator start)",
            config.display()
        );
    }
    let status = std::process::Command::new(&coordinator)
        .arg("start")
        .arg("--config")
        .arg(config)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", coordinator.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => std::process::exit(code),
        None => bail!("the coordinator was killed by a signal"),
    }
}
