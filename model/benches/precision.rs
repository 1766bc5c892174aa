//! bf16 autocast against f32: the same model, initialisation, batches and AdamW, trained side
//! by side; prints the mean loss of each per block of steps and their gap. The evidence that
//! mixed precision (`precision`) trains like f32, on any backend:
//!
//!     cargo bench -p simmim-model --bench precision -- --steps 100 --batch 16
//!     cargo bench -p simmim-model --bench precision --features cuda -- --backend cuda --batch 64

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;
use rand::{Rng, SeedableRng};
use simmim_model::precision::{autocast, Precision};
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
    /// flex (CPU) or cuda (feature `cuda`).
    #[arg(long, default_value = "flex")]
    backend: String,
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

fn run<B: AutodiffBackend + SimMimBackend>(
    args: &Args,
    config: &SimMimConfig,
    device: &B::Device,
) -> Result<Vec<(f64, f64)>> {
    let img = config.encoder.img_size();
    let geometry = config.mask_geometry()?;
    let mut models = [config.init::<B>(0, device)?, config.init::<B>(0, device)?];
    let mut optimizers = [
        AdamW::<B::InnerBackend>::new(AdamWConfig::default()),
        AdamW::<B::InnerBackend>::new(AdamWConfig::default()),
    ];
    let mut losses = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let pixels = images(step, args.batch, img);
        let images =
            Tensor::<B, 4>::from_data(TensorData::new(pixels, [args.batch, 3, img, img]), device);
        let masks: Vec<u8> = (0..args.batch as u64)
            .flat_map(|i| geometry.generate((step * args.batch) as u64 + i))
            .collect();
        let mask = mask_tensor::<B>(&masks, args.batch, geometry.token_grid(), device);
        let mut pair = [0.0; 2];
        for (i, precision) in [Precision::F32, Precision::Bf16].into_iter().enumerate() {
            let model = models[i].clone();
            let (loss, grads) = autocast(precision, || {
                loss_and_grads(&model, images.clone(), mask.clone(), 4)
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
    let losses = match args.backend.as_str() {
        "flex" => run::<Autodiff<burn_flex::Flex>>(&args, &config, &Default::default())?,
        #[cfg(feature = "cuda")]
        "cuda" => run::<Autodiff<burn_cuda::Cuda>>(&args, &config, &Default::default())?,
        other => bail!("--backend {other} is not available in this build"),
    };
    println!(
        "{} batch {}, lr {}, {} backend: mean loss per {} steps",
        args.model, args.batch, args.lr, args.backend, args.every
    );
    println!("| steps | f32 | bf16 autocast | gap | relative gap |");
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
