//! `worker plan-memory`: what one rank holds in a step (weights, gradients, AdamW moments,
//! activations) for a run's model, or for presets, computed from the config
//! ([`simmim_model::memory`]), with and without activation checkpointing, against the 80 GB
//! (H100) and 141 GB (H200) cards.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use simmim_model::memory::{plan, MemoryPlan};
use simmim_model::SimMimConfig;

pub struct PlanMemoryArgs {
    /// A run config (its model and `train.micro_batch`), or none.
    pub config: Option<PathBuf>,
    /// Presets to plan besides (or instead of) the config's model.
    pub presets: Vec<String>,
    /// Images per rank per step; default the config's micro-batch, else 64.
    pub batch: Option<usize>,
    /// Ranks sharing the optimizer state (`train.zero: 1`): more than one adds rows with the
    /// moments divided over them.
    pub ranks: usize,
}

const CARDS: [(&str, f64); 2] = [("80 GB", 80e9), ("141 GB", 141e9)];

pub fn plan_memory(args: &PlanMemoryArgs) -> Result<()> {
    let mut models: Vec<(String, SimMimConfig, usize)> = Vec::new();
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let run = simmim_proto::RunConfig::from_yaml(&text, &path.display().to_string())?;
        let batch = args.batch.unwrap_or(run.train.micro_batch);
        models.push((path.display().to_string(), run.model_config()?, batch));
    }
    for name in &args.presets {
        let config = SimMimConfig::preset(name).with_context(|| {
            format!(
                "unknown preset {name}; presets: {}",
                SimMimConfig::PRESETS.join(", ")
            )
        })?;
        models.push((name.clone(), config, args.batch.unwrap_or(64)));
    }
    print!("{}", table(&models, args.ranks));
    Ok(())
}

fn gb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e9)
}

/// The markdown table: one row per model, checkpointing setting and sharding setting (none,
/// and ZeRO-1 over `ranks` when that is more than one).
pub fn table(models: &[(String, SimMimConfig, usize)], ranks: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| model | params | img | batch/rank | checkpointing | optimizer state | weights GB | \
         grads GB | moments GB | activations GB | total GB | {} | {} |",
        CARDS[0].0, CARDS[1].0
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut shardings = vec![1];
    if ranks > 1 {
        shardings.push(ranks);
    }
    for (name, config, batch) in models {
        for checkpointing in [false, true] {
            for &shared_by in &shardings {
                let p: MemoryPlan = plan(config, *batch, checkpointing, shared_by);
                let fits = |bytes: f64| {
                    if (p.total() as f64) <= bytes {
                        "fits"
                    } else {
                        "no"
                    }
                };
                let sharding = match shared_by {
                    1 => "whole".to_string(),
                    n => format!("ZeRO-1 over {n}"),
                };
                let _ = writeln!(
                    out,
                    "| {name} | {:.0} M | {} | {batch} | {} | {sharding} | {} | {} | {} | {} | {} \
                     | {} | {} |",
                    p.parameters as f64 / 1e6,
                    config.encoder.img_size(),
                    if checkpointing { "blocks" } else { "none" },
                    gb(p.weights),
                    gb(p.gradients),
                    gb(p.moments),
                    gb(p.activations),
                    gb(p.total()),
                    fits(CARDS[0].1),
                    fits(CARDS[1].1),
                );
            }
        }
    }
    out
}
