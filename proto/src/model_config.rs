//! Model configuration: serde structs that mirror the official SimMIM YAML fields, presets at
//! the official pretraining settings, and validation that names the offending field.

use serde::{Deserialize, Serialize};

use crate::error::{config_error, ConfigError};

/// Swin Transformer encoder settings, v1 (`type: swin`, official names `MODEL.SWIN.*`) and v2
/// (`type: swinv2`, `MODEL.SWINV2.*`): the two share every field but v2's
/// `pretrained_window_sizes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinConfig {
    pub img_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub ape: bool,
    #[serde(default = "default_true")]
    pub patch_norm: bool,
    #[serde(default)]
    pub drop_path_rate: f64,
    /// SwinV2 only: per stage, the window the model was pretrained at (0: this stage's own
    /// window). The continuous position bias normalises its coordinates by it, so a model
    /// pretrained at window 12 fine-tunes at another window without resizing any table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained_window_sizes: Option<Vec<usize>>,
}

/// BEiT-style ViT encoder as SimMIM uses it (official names: `MODEL.VIT.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Layer-scale init (`gamma_1/2`); `None` disables layer scale.
    #[serde(default)]
    pub init_values: Option<f64>,
    #[serde(default)]
    pub use_ape: bool,
    /// A relative position bias table in every block.
    #[serde(default)]
    pub use_rpb: bool,
    /// One relative position bias table shared by all blocks.
    #[serde(default)]
    pub use_shared_rpb: bool,
    #[serde(default)]
    pub drop_path_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EncoderConfig {
    Swin(SwinConfig),
    /// Swin Transformer V2: scaled cosine attention, a continuous position bias, res-post-norm.
    Swinv2(SwinConfig),
    Vit(VitConfig),
}

/// The whole SimMIM model: encoder plus masking geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimMimConfig {
    pub encoder: EncoderConfig,
    #[serde(default = "default_mask_patch")]
    pub mask_patch_size: usize,
    #[serde(default = "default_mask_ratio")]
    pub mask_ratio: f64,
    /// The mask strategy, and the patch and ratio where given here (they win over the two
    /// flat fields above, which stay for the official layout).
    #[serde(default, skip_serializing_if = "crate::mask::MaskSpec::is_default")]
    pub mask: crate::mask::MaskSpec,
    /// The reconstruction loss (the paper's ablation of losses and of where they apply).
    #[serde(default, skip_serializing_if = "LossSpec::is_default")]
    pub loss: LossSpec,
    /// The prediction head (the paper's ablation of heads).
    #[serde(default, skip_serializing_if = "HeadSpec::is_default")]
    pub head: HeadSpec,
}

/// `model.config.head`: how encoder features become pixels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    #[serde(default)]
    pub kind: HeadKind,
    /// The `mlp` head's hidden width; the encoder's feature width when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    /// The `inverse_swin` head's Swin blocks per decoder stage, deepest first (one stage per
    /// patch merging of the encoder); the encoder's depths of those stages when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depths: Option<Vec<usize>>,
}

/// `linear`: one 1x1 conv and a pixel shuffle (SimMIM's). `mlp`: 1x1 conv, GELU, 1x1 conv,
/// pixel shuffle (the paper's 2-layer MLP head), `decoder.0` and `decoder.2` as an
/// `nn.Sequential` names them. `inverse_swin`: a decoder symmetric to a Swin encoder, a
/// patch expanding (Swin-Unet's) where the encoder merges and Swin blocks at each stage, then
/// a LayerNorm and the linear head at the patch grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    #[default]
    Linear,
    Mlp,
    InverseSwin,
}

impl HeadSpec {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `model.config.loss.norm_target`: each target pixel normalised by the mean and variance of
/// its `window` x `window` neighbourhood, as `norm_targets` in microsoft/Swin-Transformer's
/// SimMIM (`NORM_TARGET.PATCH_SIZE`, 47 for SwinV2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormTarget {
    #[serde(default = "default_norm_window")]
    pub window: usize,
}

fn default_norm_window() -> usize {
    47
}

/// `model.config.loss`: what the reconstruction is scored with, and on which pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSpec {
    #[serde(default)]
    pub kind: LossKind,
    /// Where `smooth_l1` turns from quadratic to linear (PyTorch's `beta`).
    #[serde(default = "default_smooth_l1_beta")]
    pub beta: f64,
    #[serde(default)]
    pub area: LossArea,
    /// Predict the target down-sampled to this side (area average of image and mask), the
    /// paper's 6^2 ... 192^2 ablation; full resolution when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_resolution: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_target: Option<NormTarget>,
}

/// The per-pixel loss, as PyTorch's `l1_loss`, `smooth_l1_loss` and `mse_loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    #[default]
    L1,
    SmoothL1,
    L2,
}

/// The pixels the loss averages over: the masked ones (SimMIM's) or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossArea {
    #[default]
    Masked,
    All,
}

fn default_smooth_l1_beta() -> f64 {
    1.0
}

impl Default for LossSpec {
    fn default() -> Self {
        Self {
            kind: LossKind::L1,
            beta: default_smooth_l1_beta(),
            area: LossArea::Masked,
            target_resolution: None,
            norm_target: None,
        }
    }
}

impl LossSpec {
    /// Whether the spec is SimMIM's own loss (then it is left out of a written config, so
    /// configs and their hashes from before it existed stay the same).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(config_error(
                "loss.beta",
                format!("{} must be a positive number", self.beta),
            ));
        }
        if let Some(norm) = self.norm_target {
            if norm.window < 3 || norm.window % 2 == 0 {
                return Err(config_error(
                    "loss.norm_target.window",
                    format!(
                        "{} must be an odd size of at least 3 (the window is centred on its pixel, \
                         and a variance needs two pixels)",
                        norm.window
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The side of the predicted target for an image of `img_size` whose features lie on a
    /// `grid` x `grid` grid, and the head's pixel-shuffle factor: `(side, side / grid)`.
    pub fn target_geometry(
        &self,
        img_size: usize,
        grid: usize,
    ) -> Result<(usize, usize), ConfigError> {
        let side = self.target_resolution.unwrap_or(img_size);
        let field = "loss.target_resolution";
        if side == 0 || side > img_size || !img_size.is_multiple_of(side) {
            return Err(config_error(
                field,
                format!("{side} must divide the image size {img_size} (the target is the image area-averaged down to it)"),
            ));
        }
        if grid == 0 || !side.is_multiple_of(grid) {
            return Err(config_error(
                field,
                format!(
                    "{side} is not a multiple of the encoder's {grid}x{grid} feature grid: the head \
                     predicts a whole number of target pixels per feature (try a multiple of {grid})"
                ),
            ));
        }
        Ok((side, side / grid))
    }
}

fn default_in_chans() -> usize {
    3
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_true() -> bool {
    true
}
fn default_mask_patch() -> usize {
    32
}
fn default_mask_ratio() -> f64 {
    0.6
}

impl SwinConfig {
    fn official(embed_dim: usize, depths: [usize; 4], heads: [usize; 4], window: usize) -> Self {
        Self {
            img_size: 192,
            patch_size: 4,
            in_chans: 3,
            embed_dim,
            depths: depths.to_vec(),
            num_heads: heads.to_vec(),
            window_size: window,
            mlp_ratio: 4.0,
            qkv_bias: true,
            ape: false,
            patch_norm: true,
            drop_path_rate: 0.0,
            pretrained_window_sizes: None,
        }
    }

    /// 64 px in patches of 2, embed 48, window 4, four stages: the tests' and benches' Swin.
    fn micro() -> Self {
        Self {
            img_size: 64,
            patch_size: 2,
            window_size: 4,
            ..Self::official(48, [2, 2, 2, 2], [3, 6, 12, 24], 4)
        }
    }

    /// Token grid side after the patch embedding.
    pub fn patches_resolution(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Token grid side of stage `i`.
    pub fn stage_resolution(&self, stage: usize) -> usize {
        self.patches_resolution() >> stage
    }

    pub fn stage_dim(&self, stage: usize) -> usize {
        self.embed_dim << stage
    }

    pub fn num_features(&self) -> usize {
        self.stage_dim(self.depths.len() - 1)
    }

    /// Effective window and shift of stage `stage`: the official code clips the window to the
    /// stage resolution and turns shifting off when the resolution is not larger than it.
    pub fn stage_window(&self, stage: usize) -> (usize, usize) {
        let res = self.stage_resolution(stage);
        if res <= self.window_size {
            (res, 0)
        } else {
            (self.window_size, self.window_size / 2)
        }
    }

    pub fn encoder_stride(&self) -> usize {
        self.patch_size << (self.depths.len() - 1)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        positive("encoder.img_size", self.img_size)?;
        positive("encoder.patch_size", self.patch_size)?;
        positive("encoder.embed_dim", self.embed_dim)?;
        positive("encoder.window_size", self.window_size)?;
        positive("encoder.in_chans", self.in_chans)?;
        if self.depths.is_empty() {
            return Err(config_error("encoder.depths", "needs at least one stage"));
        }
        if self.depths.len() != self.num_heads.len() {
            return Err(config_error(
                "encoder.num_heads",
                format!(
                    "has {} entries but `depths` has {} stages",
                    self.num_heads.len(),
                    self.depths.len()
                ),
            ));
        }
        if !self.img_size.is_multiple_of(self.patch_size) {
            return Err(config_error(
                "encoder.patch_size",
                format!(
                    "{} does not divide img_size {}",
                    self.patch_size, self.img_size
                ),
            ));
        }
        let stages = self.depths.len();
        if !self.patches_resolution().is_multiple_of(1 << (stages - 1)) {
            return Err(config_error(
                "encoder.depths",
                format!(
                    "{stages} stages halve the {0}x{0} token grid {1} times; it must stay even",
                    self.patches_resolution(),
                    stages - 1
                ),
            ));
        }
        for (stage, (&depth, &heads)) in self.depths.iter().zip(&self.num_heads).enumerate() {
            positive(&format!("encoder.depths[{stage}]"), depth)?;
            positive(&format!("encoder.num_heads[{stage}]"), heads)?;
            if !self.stage_dim(stage).is_multiple_of(heads) {
                return Err(config_error(
                    &format!("encoder.num_heads[{stage}]"),
                    format!(
                        "{heads} heads do not divide the stage width {}",
                        self.stage_dim(stage)
                    ),
                ));
            }
            let (window, _) = self.stage_window(stage);
            if !self.stage_resolution(stage).is_multiple_of(window) {
                return Err(config_error(
                    "encoder.window_size",
                    format!(
                        "window {window} does not divide the {0}x{0} token grid of stage {stage}",
                        self.stage_resolution(stage)
                    ),
                ));
            }
        }
        unit_interval("encoder.drop_path_rate", self.drop_path_rate)?;
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return Err(config_error("encoder.mlp_ratio", "must be positive"));
        }
        Ok(())
    }
}

impl SwinConfig {
    /// Stage `stage`'s pretrained window (SwinV2): `pretrained_window_sizes[stage]`, 0 when
    /// absent, meaning the stage's own (clipped) window.
    pub fn pretrained_window(&self, stage: usize) -> usize {
        self.pretrained_window_sizes
            .as_ref()
            .and_then(|sizes| sizes.get(stage).copied())
            .unwrap_or(0)
    }

    /// What only SwinV2 adds: one pretrained window per stage, and no stage whose
    /// position-bias coordinates would be divided by zero (a window of 1, normalised by
    /// `window - 1`, is NaN in the official code too).
    fn validate_v2(&self) -> Result<(), ConfigError> {
        if let Some(sizes) = &self.pretrained_window_sizes {
            if sizes.len() != self.depths.len() {
                return Err(config_error(
                    "encoder.pretrained_window_sizes",
                    format!(
                        "{sizes:?} has {} entries but `depths` has {} stages",
                        sizes.len(),
                        self.depths.len()
                    ),
                ));
            }
            if let Some(stage) = sizes.iter().position(|&s| s == 1) {
                return Err(config_error(
                    "encoder.pretrained_window_sizes",
                    format!("stage {stage}: 1 would divide the bias coordinates by zero"),
                ));
            }
        }
        for stage in 0..self.depths.len() {
            if self.stage_window(stage).0 == 1 && self.pretrained_window(stage) == 0 {
                return Err(config_error(
                    "encoder.window_size",
                    format!(
                        "stage {stage}'s window clips to its 1x1 grid, and the continuous \
                         position bias divides by window - 1; give the stage a \
                         pretrained_window_sizes entry or use fewer stages"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl VitConfig {
    pub fn patches_resolution(&self) -> usize {
        self.img_size / self.patch_size
    }

    fn validate(&self) -> Result<(), ConfigError> {
        positive("encoder.img_size", self.img_size)?;
        positive("encoder.patch_size", self.patch_size)?;
        positive("encoder.embed_dim", self.embed_dim)?;
        positive("encoder.depth", self.depth)?;
        positive("encoder.num_heads", self.num_heads)?;
        positive("encoder.in_chans", self.in_chans)?;
        if !self.img_size.is_multiple_of(self.patch_size) {
            return Err(config_error(
                "encoder.patch_size",
                format!(
                    "{} does not divide img_size {}",
                    self.patch_size, self.img_size
                ),
            ));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(config_error(
                "encoder.num_heads",
                format!(
                    "{} heads do not divide embed_dim {}",
                    self.num_heads, self.embed_dim
                ),
            ));
        }
        unit_interval("encoder.drop_path_rate", self.drop_path_rate)?;
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return Err(config_error("encoder.mlp_ratio", "must be positive"));
        }
        Ok(())
    }
}

impl EncoderConfig {
    pub fn img_size(&self) -> usize {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => c.img_size,
            Self::Vit(c) => c.img_size,
        }
    }

    pub fn patch_size(&self) -> usize {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => c.patch_size,
            Self::Vit(c) => c.patch_size,
        }
    }

    pub fn in_chans(&self) -> usize {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => c.in_chans,
            Self::Vit(c) => c.in_chans,
        }
    }

    /// Downsampling from pixels to the encoder's output grid; the head's pixel-shuffle factor.
    pub fn encoder_stride(&self) -> usize {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => c.encoder_stride(),
            Self::Vit(c) => c.patch_size,
        }
    }

    /// The Swin settings of a v1 or v2 encoder; `None` for a ViT.
    pub fn swin(&self) -> Option<&SwinConfig> {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => Some(c),
            Self::Vit(_) => None,
        }
    }

    /// Mutable [`Self::swin`], for tools that resize a preset.
    pub fn swin_mut(&mut self) -> Option<&mut SwinConfig> {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => Some(c),
            Self::Vit(_) => None,
        }
    }

    /// Channels of the encoder's output feature map.
    pub fn num_features(&self) -> usize {
        match self {
            Self::Swin(c) | Self::Swinv2(c) => c.num_features(),
            Self::Vit(c) => c.embed_dim,
        }
    }
}

impl SimMimConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.encoder {
            EncoderConfig::Swin(c) => {
                c.validate()?;
                if c.pretrained_window_sizes.is_some() {
                    return Err(config_error(
                        "encoder.pretrained_window_sizes",
                        "only a swinv2 encoder has a continuous position bias to rescale",
                    ));
                }
            }
            EncoderConfig::Swinv2(c) => {
                c.validate()?;
                c.validate_v2()?;
            }
            EncoderConfig::Vit(c) => c.validate()?,
        }
        self.mask_geometry()?;
        self.loss.validate()?;
        self.target_geometry()?;
        if self.head.hidden == Some(0) {
            return Err(config_error("head.hidden", "0 must be a positive width"));
        }
        if self.head.kind == HeadKind::InverseSwin {
            self.inverse_swin_decoder()?;
        }
        Ok(())
    }

    /// The Swin encoder the `inverse_swin` head mirrors, and the head's blocks per decoder
    /// stage, deepest first: `head.depths`, else the encoder's depths of the stages the
    /// decoder expands into.
    pub fn inverse_swin_decoder(&self) -> Result<(&SwinConfig, Vec<usize>), ConfigError> {
        let Some(c) = self.encoder.swin() else {
            return Err(config_error(
                "head.kind",
                "inverse_swin mirrors a Swin encoder's stages; this encoder is a ViT",
            ));
        };
        let stages = c.depths.len().saturating_sub(1);
        let mirrored: Vec<usize> = c.depths[..stages].iter().rev().copied().collect();
        let depths = self.head.depths.clone().unwrap_or(mirrored);
        if depths.len() != stages {
            return Err(config_error(
                "head.depths",
                format!(
                    "{depths:?} has {} stages; the encoder merges patches {stages} times, so the \
                     decoder expands {stages} times",
                    depths.len()
                ),
            ));
        }
        Ok((c, depths))
    }

    /// The predicted target's side and the head's pixel-shuffle factor (see
    /// [`LossSpec::target_geometry`]); `(img_size, encoder_stride)` by default.
    pub fn target_geometry(&self) -> Result<(usize, usize), ConfigError> {
        let img = self.encoder.img_size();
        // The inverse Swin decoder ends at the patch grid, the other heads at the encoder's.
        let stride = match self.head.kind {
            HeadKind::InverseSwin => self.encoder.patch_size(),
            HeadKind::Linear | HeadKind::Mlp => self.encoder.encoder_stride(),
        };
        self.loss.target_geometry(img, img / stride.max(1))
    }

    /// The mask patch in effect (`mask.patch`, else `mask_patch_size`).
    pub fn mask_patch(&self) -> usize {
        self.mask.patch.unwrap_or(self.mask_patch_size)
    }

    /// The mask ratio in effect (`mask.ratio`, else `mask_ratio`).
    pub fn mask_ratio(&self) -> f64 {
        self.mask.ratio.unwrap_or(self.mask_ratio)
    }

    pub fn mask_geometry(&self) -> Result<crate::mask::MaskGeometry, ConfigError> {
        crate::mask::MaskGeometry::with_strategy(
            self.encoder.img_size(),
            self.mask_patch(),
            self.encoder.patch_size(),
            self.mask_ratio(),
            self.mask.strategy,
        )
    }

    /// Presets at the official SimMIM pretraining settings, plus the small ones the benchmarks
    /// and the demo use. Returns `None` for an unknown name.
    pub fn preset(name: &str) -> Option<Self> {
        // SimMIM's defaults (mask patch 32, ratio 0.6, linear head, masked L1) around an encoder.
        let defaults = |encoder: EncoderConfig| Self {
            encoder,
            mask_patch_size: 32,
            mask_ratio: 0.6,
            mask: Default::default(),
            loss: Default::default(),
            head: Default::default(),
        };
        let swin = |c: SwinConfig| defaults(EncoderConfig::Swin(c));
        // The official SwinV2 SimMIM pretraining also sets drop path 0.1 and normalised
        // targets over a 47-pixel window.
        let swinv2 = |c: SwinConfig| Self {
            loss: LossSpec {
                norm_target: Some(NormTarget { window: 47 }),
                ..Default::default()
            },
            ..defaults(EncoderConfig::Swinv2(SwinConfig {
                drop_path_rate: 0.1,
                ..c
            }))
        };
        Some(match name {
            "swin_tiny" => swin(SwinConfig::official(96, [2, 2, 6, 2], [3, 6, 12, 24], 6)),
            "swin_small" => swin(SwinConfig::official(96, [2, 2, 18, 2], [3, 6, 12, 24], 6)),
            "swin_base" => swin(SwinConfig::official(128, [2, 2, 18, 2], [4, 8, 16, 32], 6)),
            "swin_large" => swin(SwinConfig::official(
                192,
                [2, 2, 18, 2],
                [6, 12, 24, 48],
                12,
            )),
            // SwinV2 at the SwinV2 paper's sizes, at SimMIM's pretraining geometry (192 px,
            // window 12: `simmim_pretrain__swinv2_base__img192_window12__800ep.yaml`).
            "swinv2_tiny" => swinv2(SwinConfig::official(96, [2, 2, 6, 2], [3, 6, 12, 24], 12)),
            "swinv2_small" => swinv2(SwinConfig::official(96, [2, 2, 18, 2], [3, 6, 12, 24], 12)),
            "swinv2_base" => swinv2(SwinConfig::official(128, [2, 2, 18, 2], [4, 8, 16, 32], 12)),
            "swinv2_large" => swinv2(SwinConfig::official(
                192,
                [2, 2, 18, 2],
                [6, 12, 24, 48],
                12,
            )),
            "swinv2_huge" => swinv2(SwinConfig::official(
                352,
                [2, 2, 18, 2],
                [11, 22, 44, 88],
                12,
            )),
            "swinv2_giant" => swinv2(SwinConfig::official(
                512,
                [2, 2, 42, 4],
                [16, 32, 64, 128],
                12,
            )),
            // swin_micro's geometry with SwinV2 blocks: the demo's and the benches' small V2.
            // Its last stage (a 4x4 grid) keeps window 4: windows of 1 have no position bias.
            "swinv2_micro" => Self {
                mask_patch_size: 8,
                ..defaults(EncoderConfig::Swinv2(SwinConfig::micro()))
            },
            "swin_micro" => Self {
                mask_patch_size: 8,
                ..swin(SwinConfig::micro())
            },
            "vit_base" => defaults(EncoderConfig::Vit(VitConfig {
                img_size: 224,
                patch_size: 16,
                in_chans: 3,
                embed_dim: 768,
                depth: 12,
                num_heads: 12,
                mlp_ratio: 4.0,
                qkv_bias: true,
                init_values: Some(0.1),
                use_ape: false,
                use_rpb: false,
                use_shared_rpb: true,
                drop_path_rate: 0.1,
            })),
            _ => return None,
        })
    }

    pub const PRESETS: &'static [&'static str] = &[
        "swin_tiny",
        "swin_small",
        "swin_base",
        "swin_large",
        "swin_micro",
        "swinv2_tiny",
        "swinv2_small",
        "swinv2_base",
        "swinv2_large",
        "swinv2_huge",
        "swinv2_giant",
        "swinv2_micro",
        "vit_base",
    ];
}

fn positive(field: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(config_error(field, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn unit_interval(field: &str, value: f64) -> Result<(), ConfigError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(config_error(field, format!("{value} is outside [0, 1)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_have_official_strides() {
        for name in SimMimConfig::PRESETS {
            let cfg = SimMimConfig::preset(name).expect("preset exists");
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let base = SimMimConfig::preset("swin_base").expect("preset");
        assert_eq!(base.encoder.encoder_stride(), 32);
        assert_eq!(base.encoder.num_features(), 1024);
        let vit = SimMimConfig::preset("vit_base").expect("preset");
        assert_eq!(vit.encoder.encoder_stride(), 16);
    }

    #[test]
    fn window_is_clipped_when_the_stage_is_small() {
        let EncoderConfig::Swin(c) = SimMimConfig::preset("swin_tiny").expect("preset").encoder
        else {
            unreachable!()
        };
        assert_eq!(c.stage_window(0), (6, 3));
        assert_eq!(c.stage_window(3), (6, 0));
        let EncoderConfig::Swin(c) = SimMimConfig::preset("swin_large").expect("preset").encoder
        else {
            unreachable!()
        };
        assert_eq!(c.stage_window(2), (12, 0));
        assert_eq!(c.stage_window(3), (6, 0));
    }

    /// The SwinV2 presets at the SwinV2 paper's sizes, with the official SimMIM pretraining
    /// settings (192 px, window 12 clipped to 6 at the last stage, drop path 0.1, targets
    /// normalised over 47 pixels).
    #[test]
    fn swinv2_presets_follow_the_papers() {
        for (name, embed, depths, heads) in [
            ("swinv2_base", 128, vec![2, 2, 18, 2], vec![4, 8, 16, 32]),
            ("swinv2_huge", 352, vec![2, 2, 18, 2], vec![11, 22, 44, 88]),
            (
                "swinv2_giant",
                512,
                vec![2, 2, 42, 4],
                vec![16, 32, 64, 128],
            ),
        ] {
            let cfg = SimMimConfig::preset(name).expect("preset");
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            let EncoderConfig::Swinv2(c) = &cfg.encoder else {
                panic!("{name} is not swinv2")
            };
            assert_eq!(
                (c.embed_dim, &c.depths, &c.num_heads),
                (embed, &depths, &heads)
            );
            assert_eq!(
                (c.img_size, c.window_size, c.drop_path_rate),
                (192, 12, 0.1)
            );
            assert_eq!((c.stage_window(2), c.stage_window(3)), ((12, 0), (6, 0)));
            assert_eq!(cfg.loss.norm_target, Some(NormTarget { window: 47 }));
            assert_eq!(cfg.encoder.encoder_stride(), 32);
        }
        SimMimConfig::preset("swinv2_micro")
            .expect("preset")
            .validate()
            .expect("valid");
    }

    #[test]
    fn swinv2_settings_parse_and_bad_ones_name_the_field() {
        let yaml = "encoder:\n  type: swinv2\n  img_size: 64\n  patch_size: 4\n  \
                    embed_dim: 32\n  depths: [2, 2]\n  num_heads: [2, 4]\n  window_size: 4\n  \
                    pretrained_window_sizes: [8, 6]\n";
        let cfg: SimMimConfig = serde_yaml::from_str(yaml).expect("parses");
        cfg.validate().expect("valid");
        let c = cfg.encoder.swin().expect("a swin");
        assert_eq!((c.pretrained_window(0), c.pretrained_window(1)), (8, 6));
        let v1: SimMimConfig =
            serde_yaml::from_str(&yaml.replace("swinv2", "swin")).expect("parses");
        let err = v1.validate().expect_err("v1 has no cpb").to_string();
        assert!(err.contains("encoder.pretrained_window_sizes"), "{err}");
        let short: SimMimConfig =
            serde_yaml::from_str(&yaml.replace("[8, 6]", "[8]")).expect("parses");
        let err = short.validate().expect_err("one per stage").to_string();
        assert!(err.contains("encoder.pretrained_window_sizes"), "{err}");
        // 16 px in patches of 4: a 4x4 grid, 2x2 at stage 1 and 1x1 at stage 2.
        let mut tiny = cfg.clone();
        if let Some(c) = tiny.encoder.swin_mut() {
            c.img_size = 16;
            c.pretrained_window_sizes = None;
            (c.depths, c.num_heads) = (vec![2, 2, 2], vec![2, 4, 8]);
        }
        let err = tiny.validate().expect_err("1x1 window").to_string();
        assert!(err.contains("encoder.window_size"), "{err}");
    }

    #[test]
    fn bad_heads_name_the_field() {
        let mut cfg = SimMimConfig::preset("swin_tiny").expect("preset");
        if let EncoderConfig::Swin(c) = &mut cfg.encoder {
            c.num_heads = vec![3, 6, 12];
        }
        let err = cfg.validate().expect_err("must fail").to_string();
        assert!(err.contains("encoder.num_heads"), "{err}");
    }

    /// The paper's target resolutions at swin_tiny (192 px, stride 32: a 6x6 feature grid):
    /// 6 ... 192 give a pixel-shuffle factor of side / 6; the rest are named errors.
    #[test]
    fn target_resolution_geometry_and_errors() {
        let mut cfg = SimMimConfig::preset("swin_tiny").expect("preset");
        assert_eq!(cfg.target_geometry().expect("default"), (192, 32));
        for (side, stride) in [(6, 1), (12, 2), (48, 8), (96, 16), (192, 32)] {
            cfg.loss.target_resolution = Some(side);
            cfg.validate().unwrap_or_else(|e| panic!("{side}: {e}"));
            assert_eq!(cfg.target_geometry().expect("valid"), (side, stride));
        }
        for side in [0, 7, 9, 100, 384] {
            cfg.loss.target_resolution = Some(side);
            let err = cfg.validate().expect_err("must fail").to_string();
            assert!(err.contains("loss.target_resolution"), "{side}: {err}");
        }
    }

    #[test]
    fn norm_target_window_and_head_width_are_checked() {
        let mut cfg = SimMimConfig::preset("swin_tiny").expect("preset");
        for window in [1, 4, 48] {
            cfg.loss.norm_target = Some(NormTarget { window });
            let err = cfg.validate().expect_err("must fail").to_string();
            assert!(err.contains("loss.norm_target.window"), "{window}: {err}");
        }
        cfg.loss.norm_target = Some(NormTarget { window: 47 });
        cfg.validate().expect("47 is SwinV2's");
        cfg.head.hidden = Some(0);
        let err = cfg.validate().expect_err("must fail").to_string();
        assert!(err.contains("head.hidden"), "{err}");
    }

    /// The YAML a user writes: defaults filled in, an unknown head named, and the defaults
    /// left out of a written config (so older configs keep their hashes).
    #[test]
    fn head_and_target_settings_parse_from_yaml() {
        let yaml = "encoder: {type: vit, img_size: 32, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}\n\
                    head: {kind: mlp, hidden: 64}\n\
                    loss: {kind: l2, target_resolution: 16, norm_target: {}}\n";
        let cfg: SimMimConfig = serde_yaml::from_str(yaml).expect("parses");
        assert_eq!(
            cfg.head,
            HeadSpec {
                kind: HeadKind::Mlp,
                hidden: Some(64),
                depths: None
            }
        );
        assert_eq!(cfg.loss.norm_target, Some(NormTarget { window: 47 }));
        assert_eq!(cfg.target_geometry().expect("valid"), (16, 2));
        let bad = yaml.replace("kind: mlp", "kind: inverse_swim");
        let err = serde_yaml::from_str::<SimMimConfig>(&bad).expect_err("unknown head");
        assert!(err.to_string().contains("inverse_swim"), "{err}");
        let plain = SimMimConfig::preset("swin_tiny").expect("preset");
        let written = serde_json::to_string(&plain).expect("serialises");
        assert!(
            !written.contains("\"head\"") && !written.contains("\"loss\""),
            "{written}"
        );
    }

    /// The inverse Swin head mirrors the encoder: swin_tiny merges three times, so three
    /// decoder stages of 6, 2, 2 blocks by default; it ends at the 48x48 patch grid, and a
    /// ViT or a wrong stage count is a named error.
    #[test]
    fn inverse_swin_depths_mirror_the_encoder() {
        let mut cfg = SimMimConfig::preset("swin_tiny").expect("preset");
        cfg.head.kind = HeadKind::InverseSwin;
        cfg.validate().expect("valid");
        assert_eq!(cfg.inverse_swin_decoder().expect("depths").1, vec![6, 2, 2]);
        assert_eq!(cfg.target_geometry().expect("geometry"), (192, 4));
        cfg.head.depths = Some(vec![1, 1]);
        let err = cfg.validate().expect_err("two stages").to_string();
        assert!(err.contains("head.depths"), "{err}");
        let mut vit = SimMimConfig::preset("vit_base").expect("preset");
        vit.head.kind = HeadKind::InverseSwin;
        let err = vit.validate().expect_err("vit").to_string();
        assert!(err.contains("head.kind"), "{err}");
    }
}
