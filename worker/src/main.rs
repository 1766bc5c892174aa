//! `worker`: parses the command line, dispatches to [`simmim_worker::commands`], and maps
//! errors to exit codes.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use simmim_proto::mask::MaskStrategy;
use simmim_proto::{Permanent, EXIT_DO_NOT_RETRY};
use simmim_worker::commands::inspect::{self, ExportFormat};
use simmim_worker::commands::probe::{probe_cli, ProbeArgs};
use simmim_worker::commands::{join, launch, mask_stats, plan_memory};
use simmim_worker::data;
use simmim_worker::device::Device;
use simmim_worker::user_mask::MaskBox;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A simmim-rs worker: joins a run through its coordinator and trains what the plan says.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The coordinator's URL, e.g. http://head-node:50051.
    #[arg(long, env = "SIMMIM_COORDINATOR")]
    coordinator: Option<String>,
    /// `cpu`, or `cuda` / `cuda:N` (builds with the `cuda` feature).
    #[arg(long, env = "SIMMIM_DEVICE", default_value = "cpu")]
    device: Device,
    /// Where a GPU worker keeps compiled kernels and autotune results, so a restarted worker
    /// starts in seconds instead of recompiling for minutes. Put it on a volume that outlives
    /// the pod. Ignored on the CPU and when a cubecl.toml configures cubecl itself.
    #[arg(long, env = "SIMMIM_KERNEL_CACHE", default_value = "kernel-cache")]
    kernel_cache: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Bytes per rank of weights, gradients, AdamW moments and activations, with and without
    /// activation checkpointing, against 80 GB and 141 GB cards, computed from the config
    /// (no model is built): for a run config's model and/or presets.
    PlanMemory {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Presets to plan (repeat or comma-separate), e.g. swin_base,swinv2_huge,swinv2_giant.
        #[arg(long, value_delimiter = ',')]
        preset: Vec<String>,
        /// Images per rank (default: the config's train.micro_batch, else 64).
        #[arg(long)]
        batch: Option<usize>,
        /// Ranks the optimizer state is divided over (1: not sharded).
        #[arg(long, default_value_t = 1)]
        ranks: usize,
    },
    /// Write a checkpoint's model under the official SimMIM names, for PyTorch.
    Export {
        /// A run directory or URL (its newest checkpoint, or the one at --step).
        #[arg(long)]
        checkpoint: String,
        #[arg(long)]
        step: Option<u64>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Pytorch)]
        format: ExportFormat,
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune a classifier: runs `coordinator start` (beside this binary) on a run config
    /// with a `finetune:` section, so fine-tuning is distributed and resumable like
    /// pretraining. Extra arguments go to the coordinator (e.g. --local-workers 2).
    Finetune {
        #[arg(long)]
        config: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        coordinator_args: Vec<String>,
    },
    /// k-NN and linear-probe accuracy of an encoder's frozen, average-pooled features.
    Probe {
        /// A run directory or URL (newest checkpoint), a checkpoint directory, a
        /// .safetensors file (this project's carry their model config), or an official .pth
        /// (then give --config).
        #[arg(long)]
        weights: String,
        /// A run config whose model section describes the weights (needed for a .pth).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Labelled ImageFolder (or shard index) to fit on.
        #[arg(long)]
        train: String,
        /// Labelled ImageFolder (or shard index) to score, with the same classes.
        #[arg(long)]
        test: String,
        #[arg(long, default_value_t = 10_000)]
        train_limit: usize,
        #[arg(long, default_value_t = 10_000)]
        test_limit: usize,
        #[arg(long, default_value_t = 20)]
        k: usize,
        /// Swin stage to pool (0-based); default: the final features.
        #[arg(long)]
        stage: Option<usize>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// How hard a run's masks are: AvgDist (mean distance of masked pixels to the nearest
    /// visible one) and the true masked share; --sweep prints the paper's table over
    /// strategies, mask patches 4-64 and ratios 0.1-0.9, and draws it.
    MaskStats {
        #[arg(long)]
        config: PathBuf,
        /// Masks drawn per point.
        #[arg(long, default_value_t = 64)]
        samples: usize,
        #[arg(long)]
        sweep: bool,
        /// Where --sweep draws its plot.
        #[arg(long, default_value = "mask-avgdist.png")]
        plot: PathBuf,
    },
    /// Pack an ImageFolder tree into tar shards plus `index.json` (use the index as `data.train`).
    PackShards {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        per_shard: usize,
    },
    /// Picture of what a checkpoint reconstructs for one image (original | masked | prediction
    /// pasted into the visible part | raw prediction of every pixel).
    Reconstruct {
        /// A run directory or URL (its newest checkpoint), or a model.safetensors file.
        #[arg(long)]
        checkpoint: String,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random mask.
        #[arg(long, default_value_t = 0)]
        mask_seed: u64,
        /// A drawn mask instead of a random one: a PNG, white = masked, any size (resized to
        /// the model's input and snapped to mask units: a unit is masked when half of it is).
        #[arg(long)]
        mask: Option<PathBuf>,
        /// A masked box `x,y,w,h` in the model's input pixels, snapped to mask units; repeat
        /// for more (added to --mask).
        #[arg(long = "mask-box")]
        mask_box: Vec<MaskBox>,
        /// Override the checkpoint's mask strategy for the random mask.
        #[arg(long, value_parser = parse_strategy)]
        strategy: Option<MaskStrategy>,
        /// Override the mask patch (pixels; a multiple of the model's patch dividing its input).
        #[arg(long)]
        mask_patch: Option<usize>,
        /// Override the mask ratio (0 to 1].
        #[arg(long)]
        ratio: Option<f64>,
        /// Also write the exact input, mask, loss and reconstruction as safetensors (the
        /// parity cases' names, the model config as metadata): the same batch and weights for
        /// checking another implementation, e.g. PyTorch on `worker export`'s .pth.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
}

/// `random`, `square` or `block`, named in the error otherwise.
fn parse_strategy(text: &str) -> Result<MaskStrategy, String> {
    serde_yaml::from_str(text)
        .map_err(|_| format!("`{text}`: expected one of random, square, block"))
}

fn main() {
    simmim_proto::logging::init();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("worker: error: {e:#}");
            if e.downcast_ref::<Permanent>().is_some() {
                EXIT_DO_NOT_RETRY
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::PackShards {
            input,
            output,
            per_shard,
        }) => {
            let index = data::shards::pack(&input, &output, per_shard)?;
            println!(
                "packed {} samples of {} classes into {} shards; use data.train: {}",
                index.samples.len(),
                index.classes.len(),
                index.shards.len(),
                output.join("index.json").display()
            );
            Ok(())
        }
        Some(Command::MaskStats {
            config,
            samples,
            sweep,
            plot,
        }) => mask_stats::mask_stats(&mask_stats::MaskStatsArgs {
            config,
            samples: samples.max(1),
            sweep,
            plot,
        }),
        Some(Command::PlanMemory {
            config,
            preset,
            batch,
            ranks,
        }) => {
            if config.is_none() && preset.is_empty() {
                return Err(anyhow!(
                    "give --config RUN.yaml and/or --preset NAME[,NAME]"
                ));
            }
            plan_memory::plan_memory(&plan_memory::PlanMemoryArgs {
                config,
                presets: preset,
                batch,
                ranks: ranks.max(1),
            })
        }
        Some(Command::Export {
            checkpoint,
            step,
            format,
            out,
        }) => inspect::export(&checkpoint, step, format, &out),
        Some(Command::Reconstruct {
            checkpoint,
            image,
            out,
            mask_seed,
            mask,
            mask_box,
            strategy,
            mask_patch,
            ratio,
            dump,
        }) => inspect::reconstruct(&inspect::ReconstructArgs {
            checkpoint: &checkpoint,
            image: &image,
            out: &out,
            mask_seed,
            mask: inspect::MaskOverrides {
                png: mask.as_deref(),
                boxes: &mask_box,
                strategy,
                patch: mask_patch,
                ratio,
            },
            dump: dump.as_deref(),
        }),
        Some(Command::Finetune {
            config,
            coordinator_args,
        }) => launch::finetune_via_coordinator(&config, &coordinator_args),
        Some(Command::Probe {
            weights,
            config,
            train,
            test,
            train_limit,
            test_limit,
            k,
            stage,
            json,
        }) => probe_cli(ProbeArgs {
            weights,
            config,
            train,
            test,
            limits: (train_limit, test_limit),
            k,
            stage,
            json,
        }),
        None => {
            let url = cli.coordinator.ok_or_else(|| {
                anyhow!(
                    "give --coordinator URL (or SIMMIM_COORDINATOR), or a subcommand; see --help"
                )
            })?;
            join::join(&url, cli.device, &cli.kernel_cache)
        }
    }
}
