//! Shared by the integration tests: the parity-case metadata and the model config it implies.
// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use simmim_model::config::{HeadSpec, LossSpec};
use simmim_model::weights::StateDict;
use simmim_model::{EncoderConfig, SimMimConfig, SwinConfig, VitConfig};

#[derive(Deserialize)]
pub struct Case {
    #[serde(rename = "type")]
    pub kind: String,
    pub img_size: usize,
    pub patch_size: usize,
    pub mask_patch_size: usize,
    pub mask_ratio: f64,
    pub batch: usize,
    pub encoder_stride: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub embed_dim: usize,
    pub depths: Option<Vec<usize>>,
    pub num_heads: serde_json::Value,
    pub window_size: Option<usize>,
    pub ape: Option<bool>,
    pub patch_norm: Option<bool>,
    /// SwinV2 cases: the window each stage's position bias is normalised by (0: its own).
    #[serde(default)]
    pub pretrained_window_sizes: Option<Vec<usize>>,
    pub depth: Option<usize>,
    pub init_values: Option<f64>,
    pub use_ape: Option<bool>,
    pub use_rpb: Option<bool>,
    pub use_shared_rpb: Option<bool>,
    pub train: Train,
    /// The paper's ablations (`tools/parity/simmim_reference.py`): absent in the official
    /// cases, which are the defaults.
    #[serde(default)]
    pub loss: LossSpec,
    #[serde(default)]
    pub head: HeadSpec,
}

#[derive(Deserialize)]
pub struct Train {
    pub steps: usize,
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
}

fn need<T>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| anyhow!("case metadata lacks `{field}`"))
}

impl Case {
    /// The `case` JSON in a parity file's safetensors metadata.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)?;
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("case"))
            .ok_or_else(|| anyhow!("no `case` metadata"))?;
        serde_json::from_str(json).context("parsing case metadata")
    }

    pub fn model_config(&self) -> Result<SimMimConfig> {
        let encoder = match self.kind.as_str() {
            "swin" | "swinv2" => {
                let swin = SwinConfig {
                    img_size: self.img_size,
                    patch_size: self.patch_size,
                    in_chans: 3,
                    embed_dim: self.embed_dim,
                    depths: need(self.depths.clone(), "depths")?,
                    num_heads: serde_json::from_value(self.num_heads.clone())?,
                    window_size: need(self.window_size, "window_size")?,
                    mlp_ratio: self.mlp_ratio,
                    qkv_bias: self.qkv_bias,
                    ape: need(self.ape, "ape")?,
                    patch_norm: need(self.patch_norm, "patch_norm")?,
                    drop_path_rate: 0.0,
                    pretrained_window_sizes: self.pretrained_window_sizes.clone(),
                };
                if self.kind == "swin" {
                    EncoderConfig::Swin(swin)
                } else {
                    EncoderConfig::Swinv2(swin)
                }
            }
            "vit" => EncoderConfig::Vit(VitConfig {
                img_size: self.img_size,
                patch_size: self.patch_size,
                in_chans: 3,
                embed_dim: self.embed_dim,
                depth: need(self.depth, "depth")?,
                num_heads: serde_json::from_value(self.num_heads.clone())?,
                mlp_ratio: self.mlp_ratio,
                qkv_bias: self.qkv_bias,
                init_values: self.init_values,
                use_ape: need(self.use_ape, "use_ape")?,
                use_rpb: need(self.use_rpb, "use_rpb")?,
                use_shared_rpb: need(self.use_shared_rpb, "use_shared_rpb")?,
                drop_path_rate: 0.0,
            }),
            other => bail!("unknown case type `{other}`"),
        };
        let config = SimMimConfig {
            encoder,
            mask_patch_size: self.mask_patch_size,
            mask_ratio: self.mask_ratio,
            mask: Default::default(),
            loss: self.loss,
            head: self.head.clone(),
        };
        if config.encoder.encoder_stride() != self.encoder_stride {
            bail!(
                "encoder_stride {} in the case, {} derived from the config",
                self.encoder_stride,
                config.encoder.encoder_stride()
            );
        }
        Ok(config)
    }
}

/// A parity case's tensors without its inputs and expectations: the model's state dict.
pub fn weights_of(mut state: StateDict) -> StateDict {
    state.retain(|k, _| !k.starts_with("expected.") && k != "input" && k != "mask");
    state
}

/// swin_micro cut to 32 px and two stages: every Swin code path, milliseconds per step.
pub fn small_swin_config() -> SimMimConfig {
    let mut config = SimMimConfig::preset("swin_micro").expect("preset");
    if let EncoderConfig::Swin(c) = &mut config.encoder {
        (c.img_size, c.depths, c.num_heads) = (32, vec![2, 2], vec![3, 6]);
    }
    config.validate().expect("valid");
    config
}

/// One AdamW step (lr 1e-3) of `config`'s model on two fixed 32 px images with fixed masks;
/// `pattern` (multiplier, modulus, scale) makes the pixels, so tests can differ.
pub fn fixed_step(
    config: &SimMimConfig,
    (multiplier, modulus, scale): (usize, usize, f32),
) -> impl Fn(
    simmim_model::SimMim<burn::backend::Autodiff<burn_flex::Flex>>,
    &mut simmim_model::AdamW<burn_flex::Flex>,
) -> simmim_model::SimMim<burn::backend::Autodiff<burn_flex::Flex>> {
    use burn::tensor::{Tensor, TensorData};
    type B = burn::backend::Autodiff<burn_flex::Flex>;
    let device = Default::default();
    let geometry = config.mask_geometry().expect("geometry");
    let masks: Vec<u8> = (0..2).flat_map(|i| geometry.generate(i)).collect();
    let mask = simmim_model::mask_tensor::<B>(&masks, 2, geometry.token_grid(), &device);
    let pixels: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * multiplier % modulus) as f32 / scale) - 1.0)
        .collect();
    let images = Tensor::<B, 4>::from_data(TensorData::new(pixels, [2, 3, 32, 32]), &device);
    move |model, optimizer| {
        let (_, grads) = simmim_model::loss_and_grads(&model, images.clone(), mask.clone(), 1);
        optimizer.step(1e-3, model, grads).0
    }
}
