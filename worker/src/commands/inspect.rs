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
use crate::user_mask::{self, MaskBox};
use simmim_proto::mask::{MaskGeometry, MaskStrategy};

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

/// What `worker reconstruct` shows, and where.
pub struct ReconstructArgs<'a> {
    pub checkpoint: &'a str,
    pub image: &'a Path,
    pub out: &'a Path,
    pub mask_seed: u64,
    /// The mask to draw instead of the checkpoint's configured one.
    pub mask: MaskOverrides<'a>,
    /// Also write the exact input, mask, loss and reconstruction (with the model config) as
    /// safetensors, so another implementation can be checked on the same batch and weights.
    pub dump: Option<&'a Path>,
}

/// `worker reconstruct`'s mask options: a drawn mask (a PNG and boxes, snapped to mask units),
/// or the configured strategy, mask patch and ratio overridden.
#[derive(Clone, Copy, Default)]
pub struct MaskOverrides<'a> {
    pub png: Option<&'a Path>,
    pub boxes: &'a [MaskBox],
    pub strategy: Option<MaskStrategy>,
    pub patch: Option<usize>,
    pub ratio: Option<f64>,
}

impl MaskOverrides<'_> {
    fn drawn(&self) -> bool {
        self.png.is_some() || !self.boxes.is_empty()
    }

    /// The checkpoint's mask geometry with the overrides applied.
    fn geometry(&self, config: &simmim_model::SimMimConfig) -> Result<MaskGeometry> {
        Ok(MaskGeometry::with_strategy(
            config.encoder.img_size(),
            self.patch.unwrap_or(config.mask_patch()),
            config.encoder.patch_size(),
            self.ratio.unwrap_or(config.mask_ratio()),
            self.strategy.unwrap_or(config.mask.strategy),
        )?)
    }

    /// The token mask drawn from the PNG and boxes.
    fn tokens(&self, geometry: &MaskGeometry, side: usize) -> Result<Vec<u8>> {
        let mut pixels = match self.png {
            Some(path) => user_mask::pixels_from_png(path, side)?,
            None => vec![0u8; side * side],
        };
        user_mask::add_boxes(&mut pixels, side, self.boxes);
        let units = user_mask::snap_to_units(&pixels, side, geometry.mask_patch())?;
        Ok(geometry.tokens_from_units(&units))
    }
}

pub fn reconstruct(args: &ReconstructArgs) -> Result<()> {
    let ReconstructArgs {
        checkpoint: checkpoint_location,
        image,
        out,
        mask_seed,
        mask,
        dump,
    } = *args;
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
    let geometry = mask.geometry(&config)?;
    let side = config.encoder.img_size();
    let mut prepared =
        Augment::new(side, geometry).center(&bytes, &image.display().to_string(), mask_seed)?;
    if mask.drawn() {
        prepared.mask = mask.tokens(&geometry, side)?;
    }
    let grid = geometry.token_grid();
    let output = model.forward(
        Tensor::<Flex, 4>::from_data(
            TensorData::new(prepared.pixels.clone(), [1, 3, side, side]),
            &device,
        ),
        mask_tensor::<Flex>(&prepared.mask, 1, grid, &device),
    );
    let loss = simmim_model::grads::host_values(output.loss.into_data(), || "the loss".into())?;
    // Pictures are drawn at the input's size (a coarser target is shown as blocks); the dump
    // keeps the model's own output.
    let picture = simmim_model::grads::host_values(
        model
            .at_input_size(output.reconstruction.clone(), side)
            .into_data(),
        || "the reconstruction".into(),
    )?;
    let predicted = simmim_model::grads::host_values(output.reconstruction.into_data(), || {
        "the reconstruction".into()
    })?;
    if let Some(dump) = dump {
        let batch = SingleBatch {
            pixels: &prepared.pixels,
            mask: &prepared.mask,
            loss: loss.first().copied().unwrap_or(f32::NAN),
            reconstruction: &predicted,
            side,
            grid,
        };
        std::fs::write(dump, batch.to_safetensors(&config)?)
            .with_context(|| format!("writing {}", dump.display()))?;
        println!("wrote {} (loss {:.7})", dump.display(), batch.loss);
    }
    std::fs::write(
        out,
        recon::grid_png(&prepared.pixels, &picture, &prepared.mask, side, grid),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// One image through the model, as the parity cases store it (`input`, `mask`,
/// `expected.loss`, `expected.reconstruction`, and the model config as metadata).
struct SingleBatch<'a> {
    pixels: &'a [f32],
    mask: &'a [u8],
    loss: f32,
    reconstruction: &'a [f32],
    side: usize,
    grid: usize,
}

impl SingleBatch<'_> {
    fn to_safetensors(&self, config: &simmim_model::SimMimConfig) -> Result<Vec<u8>> {
        use safetensors::tensor::{Dtype, TensorView};
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (input, loss, reconstruction) = (
            f32_bytes(self.pixels),
            f32_bytes(&[self.loss]),
            f32_bytes(self.reconstruction),
        );
        let (side, grid) = (self.side, self.grid);
        let views = [
            ("input", Dtype::F32, vec![1, 3, side, side], &input[..]),
            ("mask", Dtype::U8, vec![1, grid, grid], self.mask),
            ("expected.loss", Dtype::F32, vec![1], &loss[..]),
            (
                "expected.reconstruction",
                Dtype::F32,
                vec![1, 3, side, side],
                &reconstruction[..],
            ),
        ];
        let mut tensors = Vec::new();
        for (name, dtype, shape, data) in views {
            tensors.push((name, TensorView::new(dtype, shape, data)?));
        }
        let metadata = std::collections::HashMap::from([(
            simmim_model::weights::CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(config)?,
        )]);
        Ok(safetensors::tensor::serialize(tensors, &Some(metadata))?)
    }
}
