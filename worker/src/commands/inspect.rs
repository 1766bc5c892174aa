//! Looking into a run's checkpoints: `worker export` (the model for PyTorch, or the
//! safetensors as stored) and `worker reconstruct` (a picture of what the model fills in).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use simmim_model::weights::{
    config_from_safetensors, load_state_dict, state_dict_from_safetensors,
};
use simmim_model::{mask_tensor, InitModel};
use simmim_proto::checkpoint::layout::read_model;
use simmim_proto::store::{location_url, RunStore};

use crate::data::augment::Augment;
use crate::recon;

/// What `worker export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A .pth holding {"model": state_dict}, as the official checkpoints.
    Pytorch,
    /// The checkpoint's model.safetensors (with the model config inside).
    Safetensors,
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
    let (manifest, model) = runtime.block_on(read_model(&store, step))?;
    Ok((store, manifest, model))
}

pub fn export(location: &str, step: Option<u64>, format: ExportFormat, out: &Path) -> Result<()> {
    let (store, manifest, model) = run_model(location, step)?;
    let bytes = match format {
        ExportFormat::Safetensors => model.to_vec(),
        ExportFormat::Pytorch => crate::export::pth_bytes(&state_dict_from_safetensors(&model)?),
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

pub fn reconstruct(
    checkpoint_location: &str,
    image: &Path,
    out: &Path,
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
    let predicted = simmim_model::grads::host_values(output.reconstruction.into_data(), || {
        "the reconstruction".into()
    })?;
    std::fs::write(
        out,
        recon::grid_png(&prepared.pixels, &predicted, &prepared.mask, side, grid),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
