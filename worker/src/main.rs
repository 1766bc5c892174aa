use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use clap::{Parser, Subcommand};
use simmim_model::weights::{
    config_from_safetensors, load_state_dict, state_dict_from_safetensors,
};
use simmim_model::{mask_tensor, InitModel};
use simmim_proto::store::{location_url, RunStore};
use simmim_worker::data::augment::Augment;
use simmim_worker::finetune::finetune;
use simmim_worker::session::{RunOver, Session, Terminated};
use simmim_worker::shutdown;
use simmim_worker::train::{train, Permanent};
use simmim_worker::{checkpoint, data, recon, EXIT_DO_NOT_RETRY};

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
    device: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write a checkpoint's model under the official SimMIM names, for PyTorch.
    Export {
        /// A run directory or URL (its newest checkpoint, or the one at --step).
        #[arg(long)]
        checkpoint: String,
        #[arg(long)]
        step: Option<u64>,
        /// `pytorch`: a .pth holding {"model": state_dict}, as the official checkpoints;
        /// `safetensors`: the checkpoint's model.safetensors (with the model config inside).
        #[arg(long, default_value = "pytorch")]
        format: String,
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
    /// Pack an ImageFolder tree into tar shards plus `index.json` (use the index as `data.train`).
    PackShards {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        per_shard: usize,
    },
    /// Picture of what a checkpoint reconstructs for one image (original | masked | prediction).
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
    },
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
        Some(Command::Export {
            checkpoint,
            step,
            format,
            out,
        }) => export(&checkpoint, step, &format, &out),
        Some(Command::Reconstruct {
            checkpoint,
            image,
            out,
            mask_seed,
        }) => reconstruct(&checkpoint, &image, &out, mask_seed),
        Some(Command::Finetune {
            config,
            coordinator_args,
        }) => finetune_via_coordinator(&config, &coordinator_args),
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
            join(&url, &cli.device)
        }
    }
}

/// Generations a worker process takes part in before it gives up on its own (the coordinator
/// normally ends the run long before, through `workers.max_restarts`).
const MAX_GENERATIONS: usize = 1000;

fn join(url: &str, device: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    shutdown::install(&runtime);
    for _ in 0..MAX_GENERATIONS {
        let session = match Session::join(&runtime, url, device) {
            Ok(session) => session,
            Err(e) => return left_without_training(e),
        };
        let generation = session.joined.generation;
        let result = match device {
            "cpu" => run_generation::<Autodiff<Flex>>(&session, Default::default()),
            other => train_cuda(&session, other),
        };
        match result {
            Ok(step) => {
                let rejoin = match session.done(step) {
                    Ok(rejoin) => rejoin,
                    Err(e) => {
                        // The generation ended before the report arrived: go on to the next.
                        tracing::warn!(generation, "{e:#}; rejoining");
                        true
                    }
                };
                if shutdown::requested() {
                    return terminated(step);
                }
                if !rejoin {
                    return Ok(());
                }
                tracing::info!(
                    generation,
                    step,
                    "generation stopped after a checkpoint; rejoining"
                );
                drop(session);
            }
            Err(e) if e.downcast_ref::<Permanent>().is_some() => {
                session.fail(&format!("{e:#}"), false);
                return Err(e);
            }
            Err(e) => {
                // The generation is over (a peer died, the coordinator moved on): say why,
                // then rejoin; the next generation resumes from the last checkpoint.
                tracing::warn!(generation, "generation ended: {e:#}; rejoining");
                session.fail(&format!("{e:#}"), true);
                drop(session);
                if shutdown::requested() {
                    return terminated(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
    }
    bail!("gave up after {MAX_GENERATIONS} generations")
}

/// The worker leaves without training: the run is over (success), a stop signal arrived
/// while it waited, or joining failed.
fn left_without_training(e: anyhow::Error) -> Result<()> {
    if let Some(over) = e.downcast_ref::<RunOver>() {
        tracing::info!("nothing to do: {over}");
        return Ok(());
    }
    if e.downcast_ref::<Terminated>().is_some() {
        return terminated(0);
    }
    Err(e)
}

/// Exits after a stop signal: the generation this worker was in has checkpointed.
fn terminated(step: u64) -> Result<()> {
    if step > 0 {
        eprintln!("worker: stopped by a signal after the checkpoint of step {step}");
    } else {
        eprintln!("worker: stopped by a signal");
    }
    std::process::exit(shutdown::EXIT_TERMINATED);
}

/// Pretraining or fine-tuning, as the run config says.
fn run_generation<B>(session: &Session, device: B::Device) -> Result<u64>
where
    B: burn::tensor::backend::AutodiffBackend + simmim_model::SimMimBackend,
    B::InnerBackend: simmim_model::SimMimBackend,
{
    if session.config.finetune.is_some() {
        finetune::<B>(session, device)
    } else {
        train::<B>(session, device)
    }
}

fn finetune_via_coordinator(config: &std::path::Path, args: &[String]) -> Result<()> {
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

struct ProbeArgs {
    weights: String,
    config: Option<PathBuf>,
    train: String,
    test: String,
    limits: (usize, usize),
    k: usize,
    stage: Option<usize>,
    json: bool,
}

fn probe_cli(args: ProbeArgs) -> Result<()> {
    use simmim_model::InitClassifier;
    use simmim_worker::eval::EvalSpec;
    use simmim_worker::probe::{feature_dim, probe, ProbeSets};
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (weights, stored_config) =
        simmim_worker::weights_source::read_weights(&args.weights, runtime.handle())?;
    let model_config = match (&args.config, stored_config) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            simmim_proto::RunConfig::from_yaml(&text, &path.display().to_string())?
                .model_config()?
        }
        (None, Some(config)) => config,
        (None, None) => bail!(
            "{}: the weights do not say which model they are for; give --config run.yaml",
            args.weights
        ),
    };
    let sets = ProbeSets::open(&args.train, &args.test, args.limits, runtime.handle())?;
    let device = Default::default();
    let model = model_config.init_classifier::<Flex>(sets.classes, 0, &device)?;
    let (model, _) = simmim_model::weights::load_pretrained(model, &model_config, weights)?;
    let spec = EvalSpec {
        img_size: model_config.encoder.img_size(),
        crop_pct: None,
        batch: 256,
        rank: 0,
        world: 1,
    };
    let dim = feature_dim(&model_config.encoder, args.stage);
    let (knn, linear) = probe(
        &model.encoder,
        &sets,
        (args.stage, dim, args.k),
        &spec,
        &mut |_| Ok(()),
        &device,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "weights": args.weights, "knn_top1": knn, "linear_top1": linear, "k": args.k,
                "train_images": sets.train.len(), "test_images": sets.test.len(),
                "feature_dim": dim, "stage": args.stage, "seconds": seconds,
            })
        );
    } else {
        println!(
            "{}: k-NN (k={}) top-1 {:.2}%, linear probe top-1 {:.2}% ({} train / {} test images, {dim} features, {seconds:.1} s)",
            args.weights,
            args.k,
            100.0 * knn,
            100.0 * linear,
            sets.train.len(),
            sets.test.len()
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn train_cuda(session: &Session, device: &str) -> Result<u64> {
    let index = match device.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .trim_start_matches(':')
            .parse()
            .map_err(|_| Permanent(format!("--device `{device}`: expected cpu, cuda or cuda:N")))?,
        None => {
            return Err(
                Permanent(format!("--device `{device}`: expected cpu, cuda or cuda:N")).into(),
            )
        }
    };
    if !simmim_model::backend::cuda_driver_present() {
        return Err(
            Permanent("--device cuda: the CUDA driver library is not present".into()).into(),
        );
    }
    run_generation::<Autodiff<burn_cuda::Cuda>>(session, burn_cuda::CudaDevice::new(index))
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(_session: &Session, device: &str) -> Result<u64> {
    Err(Permanent(format!(
        "--device `{device}`: this worker was built without the `cuda` feature; use cpu"
    ))
    .into())
}

/// The model weights of a run (a directory or URL): its newest checkpoint, or `step`'s.
fn run_model(
    location: &str,
    step: Option<u64>,
) -> Result<(RunStore, simmim_proto::Manifest, bytes::Bytes)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = RunStore::open(location_url(location)?.as_str())?;
    let (manifest, model) = runtime.block_on(checkpoint::read_model(&store, step))?;
    Ok((store, manifest, model))
}

fn export(location: &str, step: Option<u64>, format: &str, out: &std::path::Path) -> Result<()> {
    if format != "pytorch" && format != "safetensors" {
        bail!("--format `{format}`: expected pytorch or safetensors");
    }
    let (store, manifest, model) = run_model(location, step)?;
    let bytes = if format == "safetensors" {
        model.to_vec()
    } else {
        simmim_worker::export::pth_bytes(&state_dict_from_safetensors(&model)?)
    };
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({:.1} MB): the model of step {} of {}",
        out.display(),
        bytes.len() as f64 / 1e6,
        manifest.step,
        store.url()
    );
    Ok(())
}

fn reconstruct(
    checkpoint_location: &str,
    image: &std::path::Path,
    out: &std::path::Path,
    mask_seed: u64,
) -> Result<()> {
    let weights_bytes = if checkpoint_location.ends_with(".safetensors") {
        std::fs::read(checkpoint_location)
            .with_context(|| format!("reading {checkpoint_location}"))?
    } else {
        run_model(checkpoint_location, None)?.2.to_vec()
    };
    let config = config_from_safetensors(&weights_bytes)?.ok_or_else(|| {
        anyhow!("{checkpoint_location}: the safetensors carry no simmim_config metadata")
    })?;
    let device = Default::default();
    let model = config.init::<Flex>(0, &device)?;
    let model = load_state_dict(
        model,
        &config,
        &state_dict_from_safetensors(&weights_bytes)?,
    )?;
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let geometry = config.mask_geometry()?;
    let side = config.encoder.img_size();
    let prepared =
        Augment::new(side, geometry).center(&bytes, &image.display().to_string(), mask_seed)?;
    let grid = geometry.token_grid();
    let output = model.forward(
        Tensor::<Flex, 4>::from_data(
            TensorData::new(prepared.pixels.clone(), [1, 3, side, side]),
            &device,
        ),
        mask_tensor::<Flex>(&prepared.mask, 1, grid, &device),
    );
    let predicted: Vec<f32> = output
        .reconstruction
        .into_data()
        .to_vec()
        .map_err(|e| anyhow!("reading the reconstruction: {e:?}"))?;
    std::fs::write(
        out,
        recon::grid_png(&prepared.pixels, &predicted, &prepared.mask, side, grid),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
