//! One full SimMIM pretraining step (forward, masked L1, backward, global-norm clip, AdamW),
//! timed on synthetic normalised images, printed as a table. Run beside
//! `../shared/bench/torch_simmim_step.py` with the same arguments to compare.
//!
//!     cargo bench -p simmim-model --bench step -- --model swin_micro --batch 64
//!     cargo bench -p simmim-model --bench step -- --model swin_micro --batch 64 --head mlp
//!     cargo bench -p simmim-model --bench step --features ndarray -- --backend ndarray
//!     cargo bench -p simmim-model --bench step --features cuda -- --backend cuda --dtype bf16
//!
//! `--dtype bf16` is mixed precision as `torch.autocast`: f32 weights and AdamW state, matmuls
//! in bf16 (`simmim_model::backend::precision`); `--dtype bf16-pure` puts every tensor in bf16 (cuda).

use std::time::Instant;

#[cfg(feature = "cuda")]
#[path = "common/kernel_cache_cli.rs"]
mod kernel_cache_cli;

use anyhow::{bail, Context, Result};
/// Burn allocates a fresh buffer per op; glibc hands large ones back to the kernel and the
/// next op page-faults them in again (measured: a third of the step). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;
use simmim_model::{
    mask_tensor, step::loss_and_grads_with, AdamW, AdamWConfig, EncoderConfig, InitModel,
    SimMimConfig,
};
use simmim_proto::run_config::ActivationCheckpointing;

#[derive(Parser, Debug)]
struct Args {
    /// Preset: swin_tiny, swin_small, swin_base, swin_large, swin_micro, vit_base.
    #[arg(long, default_value = "swin_micro")]
    model: String,
    #[arg(long)]
    batch: Option<usize>,
    /// Override the preset's image size (Swin window/ViT patch stay as in the preset).
    #[arg(long)]
    img: Option<usize>,
    #[arg(long)]
    window: Option<usize>,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// flex (default CPU), ndarray (feature `ndarray`), cuda (feature `cuda`).
    #[arg(long, default_value = "flex")]
    backend: String,
    /// f32; bf16 (autocast: bf16 matmuls, f32 weights and state); bf16-pure / f16-pure on
    /// cuda (every tensor in that type).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cuda: where compiled kernels and autotune results are kept (a warm cache skips
    /// compiling); default: cubecl's own (none for kernels).
    #[arg(long)]
    kernel_cache: Option<std::path::PathBuf>,
    /// Sub-batches computed on parallel threads (default: two per core, the fastest measured).
    #[arg(long)]
    sub_batches: Option<usize>,
    /// The prediction head: linear (SimMIM's), mlp or inverse_swin (the paper's heavier heads,
    /// to time their cost against linear on the same model).
    #[arg(long, default_value = "linear")]
    head: String,
    /// The mlp head's hidden width (default: the encoder's feature width).
    #[arg(long)]
    hidden: Option<usize>,
    /// Predict the target at this side (the paper's target-resolution ablation).
    #[arg(long)]
    target_resolution: Option<usize>,
    /// Activation checkpointing: none (keep every activation) or blocks (keep each block's
    /// input and compute the block again in the backward pass). Run each in its own process:
    /// the peak memory reported is the process's.
    #[arg(long, default_value = "none")]
    checkpointing: String,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// Accepted for cargo bench's own flag.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Timing {
    forward_backward: Vec<f64>,
    optimizer: Vec<f64>,
    /// CPU seconds the process spent (all threads) in each phase, summed over the timed steps.
    forward_backward_cpu: f64,
    optimizer_cpu: f64,
    /// From the first tensor to the end of the first step (kernel compilation included).
    first_step: f64,
    /// Resident memory with the model, optimizer and batch built, before the first step.
    rss_before_mib: f64,
}

/// `VmRSS` (now) or `VmHWM` (the process's peak) from `/proc/self/status`, in MiB; 0 where
/// there is no procfs.
fn memory_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The process's CPU time so far (user + system, every thread), from `/proc/self/stat` in
/// 10 ms ticks; 0 where there is no procfs. Set against wall time it says how many cores a
/// phase kept busy: where the step is slower than PyTorch with the same work, the idle is.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15, in clock ticks of 1/100 s.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted[sorted.len() / 2]
}

fn run<B: AutodiffBackend + simmim_model::SimMimBackend>(
    args: &Args,
    config: &SimMimConfig,
    batch: usize,
    device: &B::Device,
) -> Result<Timing>
where
    B::InnerBackend: simmim_model::SimMimBackend,
{
    let started = Instant::now();
    let precision = match args.dtype.as_str() {
        "bf16" => simmim_model::backend::precision::Precision::Bf16,
        _ => simmim_model::backend::precision::Precision::F32,
    };
    let model = config.init::<B>(0, device)?;
    let img = config.encoder.img_size();
    let geometry = config.mask_geometry()?;
    let side = geometry.token_grid();
    let masks: Vec<u8> = (0..batch as u64)
        .flat_map(|i| geometry.generate(i))
        .collect();
    let mask = mask_tensor::<B>(&masks, batch, side, device);
    let pixels: Vec<f32> = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        (0..batch * 3 * img * img)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect()
    };
    let images = Tensor::<B, 4>::from_data(TensorData::new(pixels, [batch, 3, img, img]), device);
    let mut optimizer = AdamW::<B::InnerBackend>::new(AdamWConfig::default());
    let mut model = model;
    let mut timing = Timing {
        forward_backward: vec![],
        optimizer: vec![],
        forward_backward_cpu: 0.0,
        optimizer_cpu: 0.0,
        first_step: 0.0,
        rss_before_mib: memory_mib("VmRSS:"),
    };
    let sub_batches = sub_batches(args);
    let checkpointing = match args.checkpointing.as_str() {
        "none" => ActivationCheckpointing::None,
        "blocks" => ActivationCheckpointing::Blocks,
        other => bail!("unknown --checkpointing {other}; none or blocks"),
    };
    for step in 0..args.warmup + args.steps {
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let (loss, grads) = simmim_model::backend::precision::autocast(precision, || {
            loss_and_grads_with(
                &model,
                images.clone(),
                mask.clone(),
                sub_batches,
                checkpointing,
            )
        });
        if !loss.is_finite() {
            bail!("loss is {loss} at step {step}");
        }
        B::sync(device).ok();
        let (t1, c1) = (Instant::now(), process_cpu_seconds());
        model = optimizer.step(1e-4, model, grads).0;
        B::sync(device).ok();
        let (t2, c2) = (Instant::now(), process_cpu_seconds());
        if step == 0 {
            timing.first_step = (t2 - started).as_secs_f64();
            if args.backend == "cuda" {
                eprintln!("first step done in {:.1} s", timing.first_step);
            }
        }
        if step >= args.warmup {
            timing.forward_backward.push((t1 - t0).as_secs_f64());
            timing.optimizer.push((t2 - t1).as_secs_f64());
            timing.forward_backward_cpu += c1 - c0;
            timing.optimizer_cpu += c2 - c1;
        }
    }
    Ok(timing)
}

fn sub_batches(args: &Args) -> usize {
    if args.backend == "cuda" {
        return args.sub_batches.unwrap_or(1);
    }
    args.sub_batches
        .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = SimMimConfig::preset(&args.model).with_context(|| {
        format!(
            "unknown --model {}; presets: {:?}",
            args.model,
            SimMimConfig::PRESETS
        )
    })?;
    if let Some(img) = args.img {
        match &mut config.encoder {
            EncoderConfig::Swin(c) | EncoderConfig::Swinv2(c) => c.img_size = img,
            EncoderConfig::Vit(c) => c.img_size = img,
        }
    }
    if let (Some(window), Some(c)) = (args.window, config.encoder.swin_mut()) {
        c.window_size = window;
    }
    config.head.kind = match args.head.as_str() {
        "linear" => simmim_model::config::HeadKind::Linear,
        "mlp" => simmim_model::config::HeadKind::Mlp,
        "inverse_swin" => simmim_model::config::HeadKind::InverseSwin,
        other => bail!("--head {other}: expected linear, mlp or inverse_swin"),
    };
    config.head.hidden = args.hidden;
    config.loss.target_resolution = args.target_resolution;
    config.validate()?;
    let batch = args.batch.unwrap_or(match args.model.as_str() {
        "swin_micro" => 64,
        _ => 8,
    });
    let timing = match (args.backend.as_str(), args.dtype.as_str()) {
        ("flex", "f32" | "bf16") => run::<Autodiff<burn_flex::Flex>>(&args, &config, batch, &Default::default())?,
        #[cfg(feature = "ndarray")]
        ("ndarray", "f32") => {
            run::<Autodiff<burn_ndarray::NdArray>>(&args, &config, batch, &Default::default())?
        }
        #[cfg(feature = "cuda")]
        ("cuda", dtype) => {
            if !simmim_model::backend::cuda_driver_present() {
                bail!(
                    "--backend cuda: the CUDA driver library (libcuda.so) cannot be loaded; \
                     run on a machine with an NVIDIA driver, or use --backend flex"
                );
            }
            let _compiling = kernel_cache_cli::configure(args.kernel_cache.as_deref())?;
            let device = burn_cuda::CudaDevice::default();
            match dtype {
                "f32" | "bf16" => run::<Autodiff<burn_cuda::Cuda<f32>>>(&args, &config, batch, &device)?,
                "bf16-pure" => run::<Autodiff<burn_cuda::Cuda<burn::tensor::bf16>>>(&args, &config, batch, &device)?,
                "f16-pure" => run::<Autodiff<burn_cuda::Cuda<burn::tensor::f16>>>(&args, &config, batch, &device)?,
                other => bail!("--dtype {other}: expected f32, bf16, bf16-pure or f16-pure"),
            }
        }
        (backend, dtype) => bail!(
            "--backend {backend} --dtype {dtype} is not available in this build (backends: flex{}{}; pure bf16/f16 only on cuda)",
            if cfg!(feature = "ndarray") { ", ndarray" } else { "" },
            if cfg!(feature = "cuda") { ", cuda" } else { "" },
        ),
    };
    let (fwd_bwd, opt) = (median(&timing.forward_backward), median(&timing.optimizer));
    let steps: Vec<f64> = (0..timing.forward_backward.len())
        .map(|i| timing.forward_backward[i] + timing.optimizer[i])
        .collect();
    let step = median(&steps);
    let ips = batch as f64 / step;
    let sub_batches = sub_batches(&args);
    let first = timing.first_step;
    let busy = |cpu: f64, wall: &[f64]| cpu / wall.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let fwd_bwd_busy = busy(timing.forward_backward_cpu, &timing.forward_backward);
    let opt_busy = busy(timing.optimizer_cpu, &timing.optimizer);
    let (before, peak) = (timing.rss_before_mib, memory_mib("VmHWM:"));
    let ckpt = &args.checkpointing;
    if args.json {
        println!(
            "{{\"impl\":\"burn\",\"backend\":\"{}\",\"dtype\":\"{}\",\"model\":\"{}\",\"img\":{},\"batch\":{batch},\"sub_batches\":{sub_batches},\"checkpointing\":\"{ckpt}\",\"step_s\":{step:.4},\"fwd_bwd_s\":{fwd_bwd:.4},\"opt_s\":{opt:.4},\"images_per_s\":{ips:.2},\"first_step_s\":{first:.2},\"fwd_bwd_cores_busy\":{fwd_bwd_busy:.2},\"opt_cores_busy\":{opt_busy:.2},\"rss_before_mib\":{before:.0},\"peak_rss_mib\":{peak:.0}}}",
            args.backend, args.dtype, args.model, config.encoder.img_size()
        );
    } else {
        println!("| impl | backend | model | img | batch | sub-batches | checkpointing | step s | fwd+bwd s | opt s | images/s | cores busy fwd+bwd / opt | RSS before / peak MiB |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| burn | {} {} | {} | {} | {batch} | {sub_batches} | {ckpt} | {step:.3} | {fwd_bwd:.3} | {opt:.3} | {ips:.2} | {fwd_bwd_busy:.2} / {opt_busy:.2} | {before:.0} / {peak:.0} |",
            args.backend, args.dtype, args.model, config.encoder.img_size()
        );
    }
    Ok(())
}
