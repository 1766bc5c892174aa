//! `worker --coordinator URL`: join the run, train each generation this worker is a member
//! of, and rejoin after a regroup or a failed generation until the run is over.

use std::path::Path;

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_flex::Flex;
use simmim_model::SimMimBackend;
use simmim_proto::Permanent;

use crate::device::Device;
use crate::generation::Generation;
use crate::gpu_kernels;
use crate::session::{RunOver, Session, Terminated};
use crate::shutdown;
use crate::trainer::finetune::Finetune;
use crate::trainer::pretrain::Pretrain;
use crate::trainer::train;

/// Generations a worker process takes part in before it gives up on its own (the coordinator
/// normally ends the run long before, through `workers.max_restarts`).
const MAX_GENERATIONS: usize = 1000;

pub fn join(url: &str, device: Device, kernel_cache: &Path) -> Result<()> {
    let _compiling = match device {
        Device::Cuda(_) => gpu_kernels::prepare(kernel_cache)?,
        Device::Cpu => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    shutdown::install(&runtime);
    for _ in 0..MAX_GENERATIONS {
        let (session, generation) = match Session::join(&runtime, url, device) {
            Ok(joined) => joined,
            Err(e) => return left_without_training(e),
        };
        let number = generation.number;
        match run_generation(&generation, device) {
            Ok(step) => {
                let rejoin = session.done(step).unwrap_or_else(|e| {
                    // The generation ended before the report arrived: go on to the next.
                    tracing::warn!(generation = number, "{e:#}; rejoining");
                    true
                });
                if shutdown::requested() {
                    return terminated(step);
                }
                if !rejoin {
                    return Ok(());
                }
                tracing::info!(
                    generation = number,
                    step,
                    "generation stopped after a checkpoint; rejoining"
                );
            }
            Err(e) if e.downcast_ref::<Permanent>().is_some() => {
                session.fail(&format!("{e:#}"), false);
                return Err(e);
            }
            Err(e) => {
                // The generation is over (a peer died, the coordinator moved on): say why,
                // then rejoin; the next generation resumes from the last checkpoint.
                tracing::warn!(generation = number, "generation ended: {e:#}; rejoining");
                session.fail(&format!("{e:#}"), true);
                drop((session, generation));
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

/// One generation on the configured device.
fn run_generation(generation: &Generation, device: Device) -> Result<u64> {
    match device {
        Device::Cpu => train_task::<Autodiff<Flex>>(generation, Default::default()),
        Device::Cuda(ordinal) => train_cuda(generation, ordinal),
    }
}

/// Pretraining or fine-tuning, as the run config says.
fn train_task<B>(generation: &Generation, device: B::Device) -> Result<u64>
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    if generation.config.finetune.is_some() {
        train::<B, _>(generation, Finetune::new(generation)?, device)
    } else {
        train::<B, _>(generation, Pretrain::new(generation)?, device)
    }
}

#[cfg(feature = "cuda")]
fn train_cuda(generation: &Generation, ordinal: usize) -> Result<u64> {
    if !simmim_model::backend::cuda_driver_present() {
        return Err(
            Permanent("--device cuda: the CUDA driver library is not present".into()).into(),
        );
    }
    train_task::<Autodiff<burn_cuda::Cuda>>(generation, burn_cuda::CudaDevice::new(ordinal))
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(_generation: &Generation, ordinal: usize) -> Result<u64> {
    Err(Permanent(format!(
        "--device cuda:{ordinal}: this worker was built without the `cuda` feature; use cpu"
    ))
    .into())
}
