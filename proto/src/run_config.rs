//! The run config: one YAML file that says what to train, on what, for how long, and where
//! to keep the results. Field names follow the official SimMIM config where one exists
//! (`base_lr`, `warmup_lr`, `min_lr`, ...). Validation names the offending field.

use serde::{Deserialize, Serialize};

use crate::error::{config_error, ConfigError};
use crate::model_config::SimMimConfig;

/// The demo run `coordinator start` uses when no config is given: a small Swin on CIFAR-10.
pub const DEMO_CONFIG: &str = include_str!("../../deploy/configs/demo.yaml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub output: OutputSection,
    #[serde(default)]
    pub workers: WorkersSection,
    /// TLS (rustls) for the coordinator's gRPC endpoint; absent: plain HTTP/2.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Present: the run fine-tunes a classifier on the labels of `data.train` instead of
    /// pretraining with SimMIM.
    #[serde(default)]
    pub finetune: Option<FinetuneSection>,
    /// k-NN and linear-probe accuracy of the encoder's frozen features during pretraining:
    /// a cheap health signal in `metrics.jsonl`.
    #[serde(default)]
    pub probe: Option<ProbeSection>,
}

/// Fine-tuning settings, as the official `main_finetune.py` configs name them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    /// Weights to start from: a run directory or checkpoint directory of this project, or
    /// an official `.pth` / a `.safetensors` file (local path or object-store URL);
    /// absent: train from scratch.
    #[serde(default)]
    pub pretrained: Option<String>,
    /// Layer-wise learning-rate decay (`TRAIN.LAYER_DECAY`); 1.0 turns it off.
    #[serde(default = "default_layer_decay")]
    pub layer_decay: f64,
    #[serde(default = "default_label_smoothing")]
    pub label_smoothing: f64,
    /// Mixup alpha (`AUG.MIXUP`); 0 turns it off.
    #[serde(default)]
    pub mixup: f64,
    /// CutMix alpha (`AUG.CUTMIX`); 0 turns it off.
    #[serde(default)]
    pub cutmix: f64,
    /// Chance that a batch is mixed at all (`AUG.MIXUP_PROB`).
    #[serde(default = "default_mix_prob")]
    pub mix_prob: f64,
    /// Chance of CutMix rather than Mixup when both are on (`AUG.MIXUP_SWITCH_PROB`).
    #[serde(default = "default_switch_prob")]
    pub switch_prob: f64,
    /// RandomResizedCrop's area range for training images.
    #[serde(default = "default_crop_scale")]
    pub crop_scale: (f64, f64),
    /// Evaluation: resize the shorter side to `img_size / crop_pct`, then centre-crop
    /// (`TEST.CROP`, 0.875 officially); `null`: resize straight to `img_size`.
    #[serde(default = "default_crop_pct")]
    pub test_crop_pct: Option<f64>,
    /// Score the test split every this many epochs (and at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every_epochs: u64,
    /// timm's RandAugment on training images (`rand-m9-mstd0.5-inc1` officially:
    /// `{layers: 2, magnitude: 9, magnitude_std: 0.5}`); absent: off.
    #[serde(default)]
    pub rand_augment: Option<RandAugmentSection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandAugmentSection {
    #[serde(default = "default_ra_layers")]
    pub layers: usize,
    /// Out of 10.
    #[serde(default = "default_ra_magnitude")]
    pub magnitude: f64,
    #[serde(default = "default_ra_std")]
    pub magnitude_std: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Steps between probes (and one at the end).
    pub every_steps: u64,
    /// Labelled images to fit on; default `data.train`.
    #[serde(default)]
    pub train: Option<String>,
    /// Labelled images to score; default `data.test`.
    #[serde(default)]
    pub test: Option<String>,
    /// At most this many images of each, spread evenly over the dataset's sorted order.
    #[serde(default = "default_probe_train")]
    pub train_limit: usize,
    #[serde(default = "default_probe_test")]
    pub test_limit: usize,
    /// Neighbours for the k-NN vote.
    #[serde(default = "default_knn_k")]
    pub k: usize,
    /// Swin stage whose tokens are pooled (0-based); default: the final features.
    #[serde(default)]
    pub stage: Option<usize>,
}

/// PEM files on the coordinator's machine. Workers trust the certificate through
/// `SIMMIM_TLS_CA` (a CA bundle, or the certificate itself when it is self-signed), else the
/// system's roots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The run's directory name under `root`.
    pub name: String,
    /// Where runs live: a local path or an object-store URL (`file:///...`, `s3://bucket/prefix`).
    #[serde(default = "default_root")]
    pub root: String,
    #[serde(default)]
    pub seed: u64,
}

/// Either a named preset or a full model config (`encoder`, `mask_patch_size`, `mask_ratio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub config: Option<SimMimConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// An ImageFolder directory (`<class>/<image>`), or a shard index (`index.json` written by
    /// `worker pack-shards`), as a local path or object-store URL.
    pub train: String,
    /// Use only the first N samples (in the dataset's sorted order): quick trials and tests.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Decoding threads per worker; default: the machine's cores.
    #[serde(default)]
    pub loader_threads: Option<usize>,
    /// Micro-batches decoded ahead of the step.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// The labelled evaluation split (same class folders as `train`): fine-tuning scores
    /// top-1/top-5 on it each epoch, the probe scores on it.
    #[serde(default)]
    pub test: Option<String>,
    /// Train on only this many images of each class, drawn with `subset_seed` (fine-tuning
    /// with few labels).
    #[serde(default)]
    pub labels_per_class: Option<usize>,
    #[serde(default)]
    pub subset_seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum LrSchedule {
    /// timm's CosineLRScheduler as the official code builds it: cosine over all steps from
    /// `base_lr` to `min_lr`, after a linear warmup from `warmup_lr`.
    Cosine,
    /// Multiply by `gamma` at each milestone (in epochs), after the linear warmup.
    Multistep {
        milestones: Vec<f64>,
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: f64,
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Images per worker per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub accumulation: usize,
    /// Learning rate per 512 images of global batch; the actual one is scaled by
    /// `global batch / 512` as the official `main_simmim.py` does (likewise the other two).
    pub base_lr: f64,
    #[serde(default = "default_warmup_lr")]
    pub warmup_lr: f64,
    #[serde(default = "default_min_lr")]
    pub min_lr: f64,
    #[serde(default = "default_schedule")]
    pub lr_schedule: LrSchedule,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Max global gradient norm; `null` disables clipping.
    #[serde(default = "default_clip")]
    pub clip_grad: Option<f64>,
    /// Stop after this many optimizer steps (the schedule still spans `epochs`).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Sub-batches each micro-batch is split into and computed concurrently; default: twice
    /// the cores on the CPU, the whole batch (1) on a GPU.
    #[serde(default)]
    pub compute_threads: Option<usize>,
    /// `f32`, or `bf16`: matmuls in bf16 (as `torch.autocast`), everything else in f32,
    /// weights, AdamW moments and checkpoints f32. Meant for GPUs; on the CPU bf16 is slower.
    #[serde(default)]
    pub precision: Precision,
    /// `blocks`: keep only each Transformer block's input in the forward pass and compute the
    /// block again in the backward pass (`torch.utils.checkpoint` per block, as the official
    /// `use_checkpoint`): far less activation memory for one more forward pass.
    #[serde(default)]
    pub activation_checkpointing: ActivationCheckpointing,
    /// `1`: optimizer-state sharding (ZeRO stage 1): each of N ranks keeps the AdamW moments
    /// of 1/N of the values; gradients are reduce-scattered and the updated weights
    /// all-gathered. Same numbers, same checkpoints; `0` (default): every rank keeps them all.
    #[serde(default)]
    pub zero: u8,
}

/// What the forward pass keeps for the backward pass (see
/// [`TrainSection::activation_checkpointing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    /// Every activation the backward pass reads.
    #[default]
    None,
    /// Each block's input only; the block runs again in the backward pass.
    Blocks,
}

/// The arithmetic of the matmuls (see [`TrainSection::precision`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Optimizer steps between checkpoints (one is always written at the end).
    #[serde(default = "default_checkpoint_every")]
    pub every_steps: u64,
    /// Also checkpoint when this many minutes passed since the last one; `null`: never.
    #[serde(default = "default_checkpoint_minutes")]
    pub every_minutes: Option<f64>,
    /// Committed checkpoints to keep (the newest ones); older ones are deleted.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Also keep every checkpoint whose step is a multiple of this; `null`: none.
    #[serde(default)]
    pub keep_every_steps: Option<u64>,
    /// Fail the run when no checkpoint could be written for this long (a storage outage
    /// shorter than this only skips or delays checkpoints).
    #[serde(default = "default_max_outage")]
    pub max_outage_minutes: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Steps between reconstruction pictures under `recon/`; 0 disables them.
    #[serde(default = "default_recon_every")]
    pub recon_every_steps: u64,
    /// Images in each reconstruction picture.
    #[serde(default = "default_recon_images")]
    pub recon_images: usize,
    /// Record every step's sample ids per rank in `samples.jsonl` (audits and tests).
    #[serde(default)]
    pub log_samples: bool,
    /// TensorBoard event files under `<run>/tb/`, written by the coordinator.
    #[serde(default = "default_true")]
    pub tensorboard: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSection {
    /// Workers the coordinator waits for before training starts.
    #[serde(default = "one")]
    pub min: usize,
    #[serde(default = "one")]
    pub max: usize,
    /// `cpu`, or `cuda` (each worker takes `cuda:<local rank>`).
    #[serde(default = "default_device")]
    pub device: String,
    /// Times a failed worker generation is restarted from the last checkpoint.
    #[serde(default = "default_restarts")]
    pub max_restarts: u32,
    /// A worker silent for this long is considered dead; also the gradient transport's
    /// timeout.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_s: f64,
    /// After `min` workers are present, how long to wait for the rest before forming.
    #[serde(default = "default_last_call")]
    pub last_call_s: f64,
    /// How long the coordinator waits for a new generation to form before giving up.
    #[serde(default = "default_rejoin_timeout")]
    pub rejoin_timeout_s: f64,
    /// When the world size changes and the global batch cannot be kept by changing the
    /// accumulation: scale the learning rate by the new global batch (true, as the official
    /// linear scaling rule) or keep it (false).
    #[serde(default = "default_true")]
    pub rescale_lr_on_resize: bool,
    /// Gradient bucket size for the all-reduce, in MB (DDP's default 25): NCCL sums each
    /// bucket in GPU memory; the CPU ring sums it on the host.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every_steps: default_checkpoint_every(),
            every_minutes: default_checkpoint_minutes(),
            keep_last: default_keep_last(),
            keep_every_steps: None,
            max_outage_minutes: default_max_outage(),
        }
    }
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            recon_every_steps: default_recon_every(),
            recon_images: default_recon_images(),
            log_samples: false,
            tensorboard: true,
        }
    }
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self {
            min: 1,
            max: 1,
            device: default_device(),
            max_restarts: default_restarts(),
            heartbeat_timeout_s: default_heartbeat_timeout(),
            last_call_s: default_last_call(),
            rejoin_timeout_s: default_rejoin_timeout(),
            rescale_lr_on_resize: true,
            bucket_mb: default_bucket_mb(),
        }
    }
}

fn default_root() -> String {
    "./runs".into()
}
fn default_prefetch() -> usize {
    4
}
fn default_gamma() -> f64 {
    0.1
}
fn one() -> usize {
    1
}
fn default_warmup_lr() -> f64 {
    5e-7
}
fn default_min_lr() -> f64 {
    5e-6
}
fn default_schedule() -> LrSchedule {
    LrSchedule::Cosine
}
fn default_weight_decay() -> f64 {
    0.05
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> Option<f64> {
    Some(5.0)
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_checkpoint_minutes() -> Option<f64> {
    Some(10.0)
}
fn default_keep_last() -> usize {
    5
}
fn default_max_outage() -> f64 {
    30.0
}
fn default_recon_every() -> u64 {
    500
}
fn default_recon_images() -> usize {
    8
}
fn default_device() -> String {
    "cpu".into()
}
fn default_restarts() -> u32 {
    3
}
fn default_heartbeat_timeout() -> f64 {
    30.0
}
fn default_last_call() -> f64 {
    10.0
}
fn default_rejoin_timeout() -> f64 {
    300.0
}
fn default_bucket_mb() -> f64 {
    25.0
}

impl WorkersSection {
    /// The gradient bucket size in f32 values (at least one).
    pub fn bucket_floats(&self) -> usize {
        ((self.bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
    }
}

fn default_true() -> bool {
    true
}
fn default_layer_decay() -> f64 {
    0.9
}
fn default_label_smoothing() -> f64 {
    0.1
}
fn default_mix_prob() -> f64 {
    1.0
}
fn default_switch_prob() -> f64 {
    0.5
}
fn default_crop_scale() -> (f64, f64) {
    (0.08, 1.0)
}
fn default_crop_pct() -> Option<f64> {
    Some(0.875)
}
fn default_ra_layers() -> usize {
    2
}
fn default_ra_magnitude() -> f64 {
    9.0
}
fn default_ra_std() -> f64 {
    0.5
}
fn default_eval_every() -> u64 {
    1
}
fn default_probe_train() -> usize {
    5000
}
fn default_probe_test() -> usize {
    1000
}
fn default_knn_k() -> usize {
    20
}

/// A config could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("cannot parse run config {source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("run config {source_name}: {error}")]
    Invalid {
        source_name: String,
        error: ConfigError,
    },
}

impl RunConfig {
    /// Parses and validates YAML; `source_name` (a file path, "the embedded demo config")
    /// appears in every error.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, RunConfigError> {
        let config: RunConfig = serde_yaml::from_str(text).map_err(|e| RunConfigError::Parse {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|error| RunConfigError::Invalid {
            source_name: source_name.to_string(),
            error,
        })?;
        Ok(config)
    }

    pub fn demo() -> Self {
        // The embedded demo is checked by a unit test, so this cannot fail at run time.
        Self::from_yaml(DEMO_CONFIG, "the embedded demo config")
            .unwrap_or_else(|e| panic!("embedded demo config is invalid: {e}"))
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// The model this run trains: the preset, or the explicit config.
    pub fn model_config(&self) -> Result<SimMimConfig, ConfigError> {
        match (&self.model.preset, &self.model.config) {
            (Some(_), Some(_)) => Err(config_error(
                "model",
                "give either `preset` or `config`, not both",
            )),
            (None, None) => Err(config_error(
                "model",
                "needs `preset` (one of the presets) or `config`",
            )),
            (Some(name), None) => SimMimConfig::preset(name).ok_or_else(|| {
                config_error(
                    "model.preset",
                    format!(
                        "unknown preset `{name}`; known: {}",
                        SimMimConfig::PRESETS.join(", ")
                    ),
                )
            }),
            (None, Some(config)) => Ok(config.clone()),
        }
    }

    /// Checks every field; the error names the first bad one the way the YAML spells it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_run()?;
        self.model_config()?
            .validate()
            .map_err(|e| e.within("model.config"))?;
        self.validate_data()?;
        self.validate_train()?;
        self.validate_checkpoint()?;
        self.validate_workers()?;
        if self.data.labels_per_class == Some(0) {
            return Err(config_error("data.labels_per_class", "must be at least 1"));
        }
        if let Some(f) = &self.finetune {
            self.validate_finetune(f)?;
        }
        self.validate_probe()?;
        Ok(())
    }

    /// `run:`: a name usable as a directory, a root.
    fn validate_run(&self) -> Result<(), ConfigError> {
        if self.run.name.is_empty()
            || !self
                .run
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || self.run.name.starts_with('.')
        {
            return Err(config_error(
                "run.name",
                format!(
                    "`{}` must be non-empty and use only letters, digits, `-`, `_`, `.`",
                    self.run.name
                ),
            ));
        }
        if self.run.root.is_empty() {
            return Err(config_error("run.root", "must not be empty"));
        }
        Ok(())
    }

    /// `data:`: a dataset and loader settings.
    fn validate_data(&self) -> Result<(), ConfigError> {
        if self.data.train.is_empty() {
            return Err(config_error("data.train", "must name a dataset"));
        }
        if self.data.limit == Some(0) {
            return Err(config_error("data.limit", "must be at least 1"));
        }
        if self.data.loader_threads == Some(0) {
            return Err(config_error("data.loader_threads", "must be at least 1"));
        }
        if self.data.prefetch == 0 {
            return Err(config_error("data.prefetch", "must be at least 1"));
        }
        Ok(())
    }

    /// `train:`: the schedule and the optimizer.
    fn validate_train(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        positive_f("train.epochs", t.epochs)?;
        if !(t.warmup_epochs >= 0.0 && t.warmup_epochs < t.epochs) {
            return Err(config_error(
                "train.warmup_epochs",
                format!("{} must be in [0, epochs = {})", t.warmup_epochs, t.epochs),
            ));
        }
        if t.micro_batch == 0 {
            return Err(config_error("train.micro_batch", "must be at least 1"));
        }
        if t.accumulation == 0 {
            return Err(config_error("train.accumulation", "must be at least 1"));
        }
        positive_f("train.base_lr", t.base_lr)?;
        non_negative_f("train.warmup_lr", t.warmup_lr)?;
        non_negative_f("train.min_lr", t.min_lr)?;
        non_negative_f("train.weight_decay", t.weight_decay)?;
        positive_f("train.eps", t.eps)?;
        for (i, beta) in [t.betas.0, t.betas.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&beta) {
                return Err(config_error(
                    &format!("train.betas[{i}]"),
                    format!("{beta} is outside [0, 1)"),
                ));
            }
        }
        if let Some(clip) = t.clip_grad {
            positive_f("train.clip_grad", clip)?;
        }
        if t.max_steps == Some(0) {
            return Err(config_error("train.max_steps", "must be at least 1"));
        }
        if t.compute_threads == Some(0) {
            return Err(config_error("train.compute_threads", "must be at least 1"));
        }
        if t.zero > 1 {
            return Err(config_error(
                "train.zero",
                format!(
                    "{} is not a stage simmim-rs has: 0 (off) or 1 (optimizer-state sharding)",
                    t.zero
                ),
            ));
        }
        if let LrSchedule::Multistep { milestones, gamma } = &t.lr_schedule {
            positive_f("train.lr_schedule.gamma", *gamma)?;
            if milestones.windows(2).any(|w| w[0] > w[1]) {
                return Err(config_error(
                    "train.lr_schedule.milestones",
                    "must be in increasing order",
                ));
            }
        }
        Ok(())
    }

    /// `checkpoint:`: when to save and what to keep.
    fn validate_checkpoint(&self) -> Result<(), ConfigError> {
        if self.checkpoint.every_steps == 0 {
            return Err(config_error("checkpoint.every_steps", "must be at least 1"));
        }
        if let Some(minutes) = self.checkpoint.every_minutes {
            positive_f("checkpoint.every_minutes", minutes)?;
        }
        if self.checkpoint.keep_last == 0 {
            return Err(config_error(
                "checkpoint.keep_last",
                "must be at least 1 (the newest checkpoint is what a restart resumes from)",
            ));
        }
        if self.checkpoint.keep_every_steps == Some(0) {
            return Err(config_error(
                "checkpoint.keep_every_steps",
                "must be at least 1",
            ));
        }
        positive_f(
            "checkpoint.max_outage_minutes",
            self.checkpoint.max_outage_minutes,
        )?;
        Ok(())
    }

    /// `workers:` and `tls:`: membership, timeouts, the device.
    fn validate_workers(&self) -> Result<(), ConfigError> {
        let w = &self.workers;
        if w.min == 0 {
            return Err(config_error("workers.min", "must be at least 1"));
        }
        if w.max < w.min {
            return Err(config_error(
                "workers.max",
                format!("{} is below workers.min = {}", w.max, w.min),
            ));
        }
        if w.device != "cpu" && w.device != "cuda" {
            return Err(config_error(
                "workers.device",
                format!("`{}` is not one of: cpu, cuda", w.device),
            ));
        }
        positive_f("workers.heartbeat_timeout_s", w.heartbeat_timeout_s)?;
        positive_f("workers.bucket_mb", w.bucket_mb)?;
        if let Some(tls) = &self.tls {
            if tls.cert.is_empty() {
                return Err(config_error("tls.cert", "must name a PEM certificate file"));
            }
            if tls.key.is_empty() {
                return Err(config_error("tls.key", "must name a PEM private key file"));
            }
        }
        non_negative_f("workers.last_call_s", w.last_call_s)?;
        positive_f("workers.rejoin_timeout_s", w.rejoin_timeout_s)?;
        if w.rejoin_timeout_s <= w.last_call_s && w.min < w.max {
            return Err(config_error(
                "workers.rejoin_timeout_s",
                format!(
                    "{} s is not above workers.last_call_s = {} s: a generation short of \
                     workers.max forms only after the last call, so the run would give up first",
                    w.rejoin_timeout_s, w.last_call_s
                ),
            ));
        }
        Ok(())
    }

    /// `probe:`: where its labelled images come from, its sizes.
    fn validate_probe(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.probe {
            if p.every_steps == 0 {
                return Err(config_error("probe.every_steps", "must be at least 1"));
            }
            if p.test.is_none() && self.data.test.is_none() {
                return Err(config_error(
                    "probe.test",
                    "the probe needs labelled test images: set probe.test or data.test",
                ));
            }
            if p.train_limit == 0 || p.test_limit == 0 || p.k == 0 {
                return Err(config_error(
                    "probe",
                    "train_limit, test_limit and k must be at least 1",
                ));
            }
        }
        Ok(())
    }

    fn validate_finetune(&self, f: &FinetuneSection) -> Result<(), ConfigError> {
        if self.data.test.is_none() {
            return Err(config_error(
                "data.test",
                "fine-tuning evaluates every epoch: name the labelled test split",
            ));
        }
        if !(f.layer_decay > 0.0 && f.layer_decay <= 1.0) {
            return Err(config_error(
                "finetune.layer_decay",
                format!("{} must be in (0, 1]", f.layer_decay),
            ));
        }
        if !(0.0..1.0).contains(&f.label_smoothing) {
            return Err(config_error(
                "finetune.label_smoothing",
                format!("{} must be in [0, 1)", f.label_smoothing),
            ));
        }
        if let Some(ra) = &f.rand_augment {
            if !(0.0..=10.0).contains(&ra.magnitude) {
                return Err(config_error(
                    "finetune.rand_augment.magnitude",
                    format!("{} must be in [0, 10]", ra.magnitude),
                ));
            }
            non_negative_f("finetune.rand_augment.magnitude_std", ra.magnitude_std)?;
        }
        if f.eval_every_epochs == 0 {
            return Err(config_error(
                "finetune.eval_every_epochs",
                "must be at least 1",
            ));
        }
        non_negative_f("finetune.mixup", f.mixup)?;
        non_negative_f("finetune.cutmix", f.cutmix)?;
        for (field, p) in [
            ("finetune.mix_prob", f.mix_prob),
            ("finetune.switch_prob", f.switch_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(config_error(field, format!("{p} is not a probability")));
            }
        }
        let (lo, hi) = f.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(config_error(
                "finetune.crop_scale",
                format!("[{lo}, {hi}] must satisfy 0 < low <= high <= 1"),
            ));
        }
        if let Some(pct) = f.test_crop_pct {
            if !(pct > 0.0 && pct <= 1.0) {
                return Err(config_error(
                    "finetune.test_crop_pct",
                    format!("{pct} must be in (0, 1]"),
                ));
            }
        }
        if self.probe.is_some() {
            return Err(config_error(
                "probe",
                "the probe is for pretraining runs; a fine-tuning run reports test accuracy",
            ));
        }
        Ok(())
    }

    /// The configured global batch: `workers.max` ranks of `micro_batch x accumulation`.
    pub fn reference_global_batch(&self) -> usize {
        self.workers.max * self.train.micro_batch * self.train.accumulation
    }

    /// The batch shape for a generation of `world` ranks: the accumulation that keeps the
    /// configured global batch when it divides, else the configured accumulation with the
    /// learning rate scaled (or not) by the new global batch. Returns
    /// `(accumulation, lr_scale, note)` where `note` says what changed, if anything.
    pub fn batch_for_world(&self, world: usize) -> (usize, f64, Option<String>) {
        let target = self.reference_global_batch();
        let per_step = world * self.train.micro_batch;
        if per_step > 0 && target.is_multiple_of(per_step) {
            return (target / per_step, target as f64 / 512.0, None);
        }
        let accumulation = self.train.accumulation;
        let global = per_step * accumulation;
        let scale = if self.workers.rescale_lr_on_resize {
            global as f64 / 512.0
        } else {
            target as f64 / 512.0
        };
        let note = format!(
            "{world} workers cannot keep the global batch of {target} (micro_batch {} does not divide it); \
             training with {global} per step and learning rates {}",
            self.train.micro_batch,
            if self.workers.rescale_lr_on_resize { "scaled to it" } else { "unchanged" }
        );
        (accumulation, scale, Some(note))
    }
}

fn positive_f(field: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(config_error(
            field,
            format!("{value} must be a positive number"),
        ))
    }
}

fn non_negative_f(field: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(config_error(
            field,
            format!("{value} must be zero or positive"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let demo = RunConfig::demo();
        assert_eq!(demo.workers.device, "cpu");
        demo.model_config().expect("model");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = DEMO_CONFIG.replace("micro_batch: ", "micro_batch: 0 #");
        let err = RunConfig::from_yaml(&bad, "x.yaml")
            .expect_err("invalid")
            .to_string();
        assert!(
            err.contains("train.micro_batch") && err.contains("x.yaml"),
            "{err}"
        );

        let mut c = RunConfig::demo();
        c.model.preset = Some("swin_huge".into());
        c.model.config = None;
        let err = c.validate().expect_err("invalid").to_string();
        assert!(
            err.contains("model.preset") && err.contains("swin_tiny"),
            "{err}"
        );

        let bad = DEMO_CONFIG.replace("train:\n", "train:\n  zero: 3\n");
        let err = RunConfig::from_yaml(&bad, "x.yaml")
            .expect_err("invalid")
            .to_string();
        assert!(
            err.contains("train.zero") && err.contains("0 (off) or 1"),
            "{err}"
        );

        let mut c = RunConfig::demo();
        c.train.warmup_epochs = c.train.epochs;
        assert!(c
            .validate()
            .expect_err("invalid")
            .to_string()
            .contains("train.warmup_epochs"));

        // Timing that cannot work names both fields.
        let mut c = RunConfig::demo();
        (c.workers.min, c.workers.max) = (1, 2);
        (c.workers.last_call_s, c.workers.rejoin_timeout_s) = (60.0, 30.0);
        let err = c.validate().expect_err("invalid").to_string();
        assert!(
            err.contains("workers.rejoin_timeout_s") && err.contains("workers.last_call_s"),
            "{err}"
        );
        // A last call longer than the heartbeat timeout is fine: waiting is not silence.
        (c.workers.last_call_s, c.workers.rejoin_timeout_s) = (20.0, 300.0);
        c.workers.heartbeat_timeout_s = 15.0;
        c.validate().expect("valid");
    }

    #[test]
    fn finetune_and_probe_settings_are_checked_by_name() {
        let finetune = |section: &str, data: &str| {
            let text = DEMO_CONFIG.replace(
                "  train: ./data/cifar10/train\n",
                &format!("  train: ./data/cifar10/train\n{data}"),
            ) + section;
            RunConfig::from_yaml(&text, "ft.yaml")
        };
        let ok = finetune(
            "finetune:\n  pretrained: ./runs/demo\n",
            "  test: ./data/cifar10/test\n",
        )
        .expect("a valid fine-tuning config");
        let f = ok.finetune.expect("section");
        assert_eq!(
            (f.layer_decay, f.label_smoothing, f.eval_every_epochs),
            (0.9, 0.1, 1)
        );
        assert_eq!(f.test_crop_pct, Some(0.875));

        for (section, data, field) in [
            ("finetune:\n  layer_decay: 0.9\n", "", "data.test"),
            (
                "finetune:\n  layer_decay: 1.5\n",
                "  test: t\n",
                "finetune.layer_decay",
            ),
            (
                "finetune:\n  crop_scale: [0.9, 0.2]\n",
                "  test: t\n",
                "finetune.crop_scale",
            ),
            (
                "finetune:\n  mix_prob: 2\n",
                "  test: t\n",
                "finetune.mix_prob",
            ),
            ("probe:\n  every_steps: 10\n", "", "probe.test"),
            (
                "probe:\n  every_steps: 0\n",
                "  test: t\n",
                "probe.every_steps",
            ),
            ("", "  labels_per_class: 0\n", "data.labels_per_class"),
        ] {
            let err = finetune(section, data).expect_err(field).to_string();
            assert!(
                err.contains(field) && err.contains("ft.yaml"),
                "{field}: {err}"
            );
        }
        let err = finetune(
            "finetune:\n  layer_decay: 0.9\n  warmup: 3\n",
            "  test: t\n",
        )
        .expect_err("unknown field")
        .to_string();
        assert!(err.contains("warmup"), "{err}");
    }

    #[test]
    fn nested_model_errors_carry_the_section() {
        let mut c = RunConfig::demo();
        let mut model = c.model_config().expect("model");
        model.mask_ratio = 1.5;
        c.model = ModelSection {
            preset: None,
            config: Some(model),
        };
        let err = c.validate().expect_err("invalid").to_string();
        assert!(err.contains("model.config.mask_ratio"), "{err}");
    }

    #[test]
    fn unknown_and_mistyped_fields_are_parse_errors_naming_them() {
        let bad = DEMO_CONFIG.replace("micro_batch:", "micro_bach:");
        let err = RunConfig::from_yaml(&bad, "x.yaml")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("micro_bach"), "{err}");
        let bad = DEMO_CONFIG.replace("base_lr: ", "base_lr: fast #");
        let err = RunConfig::from_yaml(&bad, "x.yaml")
            .expect_err("mistyped")
            .to_string();
        assert!(err.contains("base_lr") || err.contains("line"), "{err}");
    }

    #[test]
    fn accumulation_keeps_the_global_batch_when_it_divides() {
        let mut c = RunConfig::demo();
        (c.train.micro_batch, c.train.accumulation, c.workers.max) = (8, 1, 4);
        assert_eq!(c.batch_for_world(4), (1, 32.0 / 512.0, None));
        assert_eq!(c.batch_for_world(2), (2, 32.0 / 512.0, None));
        let (accumulation, scale, note) = c.batch_for_world(3);
        assert_eq!((accumulation, scale), (1, 24.0 / 512.0));
        assert!(note
            .expect("says so")
            .contains("cannot keep the global batch of 32"));
        c.workers.rescale_lr_on_resize = false;
        assert_eq!(c.batch_for_world(3).1, 32.0 / 512.0);
    }

    #[test]
    fn lr_scale_is_global_batch_over_512() {
        let mut c = RunConfig::demo();
        c.train.micro_batch = 128;
        c.train.accumulation = 2;
        c.workers.max = 16;
        assert_eq!(c.batch_for_world(16), (2, 8.0, None));
    }
}

#[cfg(test)]
mod shipped_configs {
    use super::*;

    /// Every config in deploy/configs and experiments/ parses and validates.
    #[test]
    fn deploy_configs_are_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut count = 0;
        let entries = ["deploy/configs", "experiments/cifar10"]
            .iter()
            .flat_map(|dir| std::fs::read_dir(root.join(dir)).expect("config directory"));
        for entry in entries {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("read");
                let config = RunConfig::from_yaml(&text, &path.display().to_string())
                    .unwrap_or_else(|e| panic!("{e}"));
                config.model_config().expect("model");
                count += 1;
            }
        }
        assert!(
            count >= 6,
            "expected the demo, four official configs and the experiment's, found {count}"
        );
    }
}
