//! bf16 autocast against f32: the same model, initialisation, batches and AdamW, trained side
//! by side; prints the mean loss of each per block of steps and their gap. The evidence that
//! mixed precision (`precision`) trains like f32, on any backend:
//!
//!     cargo bench -p simmim-model --bench precision -- --steps 100 --batch 16
//!     cargo bench -p simmim-model --bench precision --features cuda -- --backend cuda --batch 64

#[cfg(feature = "cuda")]
#[path = "common/kernel_cache_cli.rs"]
mod kernel_cache_cli;

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;
use rand::{Rng, SeedableRng};
use simmim_model::backend::precision::{autocast, Precision};
use simmim_model::{
    loss_and_grads, mask_tensor, AdamW, AdamWConfig, InitModel, SimMimBackend, SimMimConfig,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "swin_micro")]
    model: String,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Steps per row of the table.
    #[arg(long, default_value_t = 10)]
    every: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// The second run's precision: bf16, or f32 to measure how far two f32 runs drift
    /// apart from summation order alone (with `--second-sub-batches` other than 4).
    #[arg(long, default_value = "bf16")]
    second: String,
    /// Sub-batches of the second run (the first uses 4): another summation order.
    #[arg(long, default_value_t = 4)]
    second_sub_batches: usize,
    /// Instead of training: each parameter's relative gradient error of bf16 against f32 on
    /// the first batch (same weights), worst first; compare with
    /// `tools/bench/torch_precision.py --grad-errors`.
    #[arg(long)]
    grad_errors: bool,
    /// flex (CPU) or cuda (feature `cuda`).
    #[arg(long, default_value = "flex")]
    backend: String,
    /// cuda: where compiled kernels are kept (as the worker's `--kernel-cache`); without it
    /// every kernel is compiled again in each run.
    #[arg(long)]
    kernel_cache: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

/// Smooth random images (a few low-frequency waves per channel), so the loss can fall.
fn images(step: usize, batch: usize, img: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(step as u64);
    let mut out = Vec::with_capacity(batch * 3 * img * img);
    for _ in 0..batch * 3 {
        let (fx, fy, phase, amp) = (
            rng.random_range(0.05f32..0.4),
            rng.random_range(0.05f32..0.4),
            rng.random_range(0.0f32..6.3),
            rng.random_range(0.5f32..1.5),
        );
        for y in 0..img {
            for x in 0..img {
                out.push(amp * ((x as f32 * fx + phase).sin() + (y as f32 * fy).cos()) * 0.7);
            }
        }
    }
    out
}

/// Step `step`'s images and masks (mask ids continue across steps), the same for both runs.
fn batch<B: AutodiffBackend>(
    step: usize,
    size: usize,
    config: &SimMimConfig,
    device: &B::Device,
) -> Result<(Tensor<B, 4>, Tensor<B, 3>)> {
    let img = config.encoder.img_size();
    let geometry = config.mask_geometry()?;
    let images = Tensor::from_data(
        TensorData::new(images(step, size, img), [size, 3, img, img]),
        device,
    );
    let masks: Vec<u8> = (0..size as u64)
        .flat_map(|i| geometry.generate((step * size) as u64 + i))
        .collect();
    Ok((
        images,
        mask_tensor::<B>(&masks, size, geometry.token_grid(), device),
    ))
}

/// Relative L2 error of each parameter's bf16 gradient against its f32 one, worst first.
fn grad_errors<B: AutodiffBackend + SimMimBackend>(
    args: &Args,
    config: &SimMimConfig,
    device: &B::Device,
) -> Result<Vec<(String, f64)>>
where
    B::InnerBackend: SimMimBackend,
{
    use simmim_model::weights::{gradient_state_dict, HostTensor};
    let model = config.init::<B>(0, device)?;
    let (images, mask) = batch::<B>(0, args.batch, config, device)?;
    let mut dicts = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let (_, grads) = autocast(precision, || {
            loss_and_grads(&model, images.clone(), mask.clone(), 1)
        });
        dicts.push(gradient_state_dict::<B, _>(&model, &grads)?);
    }
    let mut errors = Vec::new();
    for (name, exact) in &dicts[0] {
        let (HostTensor::F32 { values: a, .. }, Some(HostTensor::F32 { values: b, .. })) =
            (exact, dicts[1].get(name))
        else {
            continue;
        };
        let norm = a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            errors.push((name.clone(), diff / norm));
        }
    }
    errors.sort_by(|x, y| y.1.total_cmp(&x.1));
    Ok(errors)
}

fn run<B: AutodiffBackend + SimMimBackend>(
    args: &Args,
    config: &SimMimConfig,
    device: &B::Device,
) -> Result<Vec<(f64, f64)>>
where
    B::InnerBackend: SimMimBackend,
{
    let mut models = [config.init::<B>(0, device)?, config.init::<B>(0, device)?];
    let mut optimizers = [
        AdamW::<B::InnerBackend>::new(AdamWConfig::default()),
        AdamW::<B::InnerBackend>::new(AdamWConfig::default()),
    ];
    let second = match args.second.as_str() {
        "f32" => Precision::F32,
        _ => Precision::Bf16,
    };
    let mut losses = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let (images, mask) = batch::<B>(step, args.batch, config, device)?;
        let mut pair = [0.0; 2];
        for (i, (precision, sub_batches)) in
            [(Precision::F32, 4), (second, args.second_sub_batches)]
                .into_iter()
                .enumerate()
        {
            let model = models[i].clone();
            let (loss, grads) = autocast(precision, || {
                loss_and_grads(&model, images.clone(), mask.clone(), sub_batches)
            });
            if !loss.is_finite() {
                bail!("{precision:?} loss is {loss} at step {step}");
            }
            pair[i] = loss;
            models[i] = optimizers[i].step(args.lr, model, grads).0;
        }
        losses.push((pair[0], pair[1]));
    }
    Ok(losses)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let Some(config) = SimMimConfig::preset(&args.model) else {
        bail!(
            "unknown --model {}; presets: {:?}",
            args.model,
            SimMimConfig::PRESETS
        );
    };
    if args.grad_errors {
        let errors = grad_errors::<Autodiff<burn_flex::Flex>>(&args, &config, &Default::default())?;
        let median = errors[errors.len() / 2].1;
        println!(
            "{} parameters; median relative gradient error {median:.2e}",
            errors.len()
        );
        println!("| parameter | relative error |");
        println!("|---|---|");
        for (name, error) in errors.iter().take(15) {
            println!("| {name} | {error:.2e} |");
        }
        return Ok(());
    }
    let losses = match args.backend.as_str() {
        "flex" => run::<Autodiff<burn_flex::Flex>>(&args, &config, &Default::default())?,
        #[cfg(feature = "cuda")]
        "cuda" => {
            let _compiling = kernel_cache_cli::configure(args.kernel_cache.as_deref())?;
            run::<Autodiff<burn_cuda::Cuda>>(&args, &config, &Default::default())?
        }
        other => bail!("--backend {other} is not available in this build"),
    };
    println!(
        "{} batch {}, lr {}, {} backend: mean loss per {} steps",
        args.model, args.batch, args.lr, args.backend, args.every
    );
    println!(
        "| steps | f32 | {} ({} sub-batches) | gap | relative gap |",
        args.second, args.second_sub_batches
    );
    println!("|---|---|---|---|---|");
    for (block, rows) in losses.chunks(args.every).enumerate() {
        let n = rows.len() as f64;
        let f32_mean = rows.iter().map(|r| r.0).sum::<f64>() / n;
        let bf16_mean = rows.iter().map(|r| r.1).sum::<f64>() / n;
        println!(
            "| {}-{} | {f32_mean:.5} | {bf16_mean:.5} | {:+.5} | {:.3}% |",
            block * args.every + 1,
            block * args.every + rows.len(),
            bf16_mean - f32_mean,
            100.0 * (bf16_mean - f32_mean).abs() / f32_mean
        );
    }
    Ok(())
}
