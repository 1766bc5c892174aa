//! Import and export of weights under the official SimMIM names: safetensors both ways, and
//! PyTorch `.pth` checkpoints (state under `model`, or a plain state dict) in.

pub mod init;
pub mod naming;
pub mod safetensors_writer;
pub mod snapshot;

mod host;
pub use host::{HostTensor, StateDict, CONFIG_METADATA_KEY};

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::classifier::Classifier;
use crate::config::{EncoderConfig, HeadKind, SimMimConfig, SwinConfig};
use crate::encoders::rel_pos::{
    resize_swin_table, swin_relative_position_index, swin_shift_mask, swinv2_coords_table,
    vit_relative_position_index,
};
use crate::encoders::swin::SwinVersion;
use crate::error::ModelError;
use crate::weights::naming::parameters;
use crate::weights::naming::PathTracker;
use crate::weights::safetensors_writer::{push_host, start_file, Entry};

/// Reads a state dict from `.safetensors`, or from a PyTorch `.pth`/`.pt`/`.bin` checkpoint
/// (taking the `model` entry when there is one, as official SimMIM checkpoints have).
pub fn read_state_dict(path: &Path) -> Result<StateDict, ModelError> {
    let read_err = |reason: String| ModelError::Read {
        path: path.display().to_string(),
        reason,
    };
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        return state_dict_from_safetensors(&bytes).map_err(|e| match e {
            ModelError::Read { reason, .. } => read_err(reason),
            other => other,
        });
    }
    use burn_store::pytorch::PytorchReader;
    let reader = match PytorchReader::with_top_level_key(path, "model") {
        Ok(reader) => reader,
        Err(_) => PytorchReader::new(path).map_err(|e| read_err(e.to_string()))?,
    };
    let mut dict = StateDict::new();
    for (name, snapshot) in reader.into_tensors() {
        let data = snapshot
            .to_data()
            .map_err(|e| read_err(format!("tensor `{name}`: {e:?}")))?;
        dict.insert(name, host_tensor(data).map_err(read_err)?);
    }
    Ok(dict)
}

fn host_tensor(data: TensorData) -> Result<HostTensor, String> {
    let shape = data.shape.to_vec();
    let int = matches!(
        data.dtype,
        DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U64 | DType::U32 | DType::U8
    );
    if int {
        let values = data
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| format!("{e:?}"))?;
        Ok(HostTensor::I64 { shape, values })
    } else {
        let values = data
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        Ok(HostTensor::F32 { shape, values })
    }
}

/// Parses safetensors bytes into a state dict (f32/f64/f16/bf16 as f32, integers as i64).
pub fn state_dict_from_safetensors(bytes: &[u8]) -> Result<StateDict, ModelError> {
    let read_err = |reason: String| ModelError::Read {
        path: "<safetensors bytes>".to_string(),
        reason,
    };
    let file = SafeTensors::deserialize(bytes).map_err(|e| read_err(e.to_string()))?;
    let mut dict = StateDict::new();
    for (name, view) in file.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let tensor = match view.dtype() {
            Dtype::F32 => HostTensor::F32 {
                shape,
                values: data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            },
            Dtype::F64 => HostTensor::F32 {
                shape,
                values: data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
            },
            Dtype::I64 => HostTensor::I64 {
                shape,
                values: data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect(),
            },
            Dtype::U8 => HostTensor::I64 {
                shape,
                values: data.iter().map(|&b| b as i64).collect(),
            },
            other => {
                return Err(read_err(format!(
                    "tensor `{name}` has dtype {other:?}, expected F32, F64, I64 or U8"
                )))
            }
        };
        dict.insert(name, tensor);
    }
    Ok(dict)
}

/// The buffers the official modules register (`relative_position_index`, `attn_mask`),
/// derived from the config: what a strict `load_state_dict` in PyTorch expects besides the
/// parameters.
/// The buffers of `depth` Swin blocks of stage `stage`'s geometry under `prefix.blocks.N`:
/// every block's relative position index (and SwinV2's `relative_coords_table`,
/// `[1, 2W-1, 2W-1, 2]`), and the shifted blocks' attention masks.
fn swin_block_buffers(
    buffers: &mut StateDict,
    prefix: &str,
    c: &SwinConfig,
    version: SwinVersion,
    stage: usize,
    depth: usize,
) {
    let (window, shift) = c.stage_window(stage);
    let n = window * window;
    let res = c.stage_resolution(stage);
    let side = 2 * window - 1;
    for block in 0..depth {
        let prefix = format!("{prefix}.blocks.{block}");
        if version == SwinVersion::V2 {
            buffers.insert(
                format!("{prefix}.attn.relative_coords_table"),
                HostTensor::F32 {
                    shape: vec![1, side, side, 2],
                    values: swinv2_coords_table(window, c.pretrained_window(stage)),
                },
            );
        }
        buffers.insert(
            format!("{prefix}.attn.relative_position_index"),
            HostTensor::I64 {
                shape: vec![n, n],
                values: swin_relative_position_index(window),
            },
        );
        if block % 2 == 1 && shift > 0 {
            let windows = (res / window) * (res / window);
            buffers.insert(
                format!("{prefix}.attn_mask"),
                HostTensor::F32 {
                    shape: vec![windows, n, n],
                    values: swin_shift_mask(res, window, shift),
                },
            );
        }
    }
}

pub fn official_buffers(config: &SimMimConfig) -> StateDict {
    let mut buffers = StateDict::new();
    match &config.encoder {
        EncoderConfig::Swin(c) | EncoderConfig::Swinv2(c) => {
            let version = match config.encoder {
                EncoderConfig::Swinv2(_) => SwinVersion::V2,
                _ => SwinVersion::V1,
            };
            for (stage, &depth) in c.depths.iter().enumerate() {
                let prefix = format!("encoder.layers.{stage}");
                swin_block_buffers(&mut buffers, &prefix, c, version, stage, depth);
            }
            // The inverse Swin head's decoder stages, deepest first.
            if let (HeadKind::InverseSwin, Ok((_, depths))) =
                (config.head.kind, config.inverse_swin_decoder())
            {
                let stages = (0..c.depths.len().saturating_sub(1)).rev();
                for (layer, (stage, depth)) in stages.zip(depths).enumerate() {
                    let prefix = format!("decoder.layers.{layer}");
                    // Swin-Unet's decoder: v1 blocks, whichever Swin the encoder is.
                    swin_block_buffers(&mut buffers, &prefix, c, SwinVersion::V1, stage, depth);
                }
            }
        }
        EncoderConfig::Vit(c) => {
            let grid = c.patches_resolution();
            let n = grid * grid + 1;
            let index = || HostTensor::I64 {
                shape: vec![n, n],
                values: vit_relative_position_index(grid),
            };
            if c.use_shared_rpb {
                buffers.insert(
                    "encoder.rel_pos_bias.relative_position_index".into(),
                    index(),
                );
            }
            if c.use_rpb {
                for block in 0..c.depth {
                    buffers.insert(
                        format!("encoder.blocks.{block}.attn.relative_position_index"),
                        index(),
                    );
                }
            }
        }
    }
    buffers
}

/// Whether a checkpoint's buffer is the one the config implies: indices exactly, float
/// buffers to f32 rounding (SwinV2's log-spaced coordinates go through `log2`, whose last
/// bit may differ between torch's and Rust's libm).
fn buffer_agrees(found: &HostTensor, expected: &HostTensor) -> bool {
    match (found, expected) {
        (
            HostTensor::F32 {
                shape: a,
                values: x,
            },
            HostTensor::F32 {
                shape: b,
                values: y,
            },
        ) => {
            a == b
                && x.iter()
                    .zip(y)
                    .all(|(p, q)| (p - q).abs() <= 1e-6 * q.abs().max(1.0))
        }
        _ => found == expected,
    }
}

/// Replaces every parameter of `model` with the tensor of the same official name.
/// Buffers are checked against the config; anything missing, left over or of the wrong shape
/// fails the whole load with every offending key listed.
pub fn load_state_dict<B: Backend, M: Module<B>>(
    model: M,
    config: &SimMimConfig,
    state: &StateDict,
) -> Result<M, ModelError> {
    let buffers = official_buffers(config);
    for (name, expected) in &buffers {
        if let Some(found) = state.get(name) {
            if !buffer_agrees(found, expected) {
                return Err(ModelError::BufferMismatch {
                    name: name.clone(),
                    reason: format!(
                        "shape {:?} vs expected {:?}, or different values",
                        found.shape(),
                        expected.shape()
                    ),
                });
            }
        }
    }
    load_params(model, state, &|name| buffers.contains_key(name), &|_| false)
}

/// Copies every tensor of `state` into the parameter of the same official name. Keys for
/// which `ignored` holds are skipped; parameters missing from `state` are an error unless
/// `optional` holds for them (they keep their initial values).
fn load_params<B: Backend, M: Module<B>>(
    model: M,
    state: &StateDict,
    ignored: &dyn Fn(&str) -> bool,
    optional: &dyn Fn(&str) -> bool,
) -> Result<M, ModelError> {
    struct Loader<'a, B: Backend> {
        tracker: PathTracker,
        state: &'a StateDict,
        optional: &'a dyn Fn(&str) -> bool,
        device: B::Device,
        used: BTreeSet<String>,
        missing: Vec<String>,
        wrong_shape: Vec<String>,
    }
    impl<B: Backend> ModuleMapper<B> for Loader<'_, B> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.tracker.exit(container_type);
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let official = self.tracker.official();
            let mut expected: Vec<usize> = param.dims().to_vec();
            if official.transposed {
                expected.reverse();
            }
            let Some(found) = self.state.get(&official.name) else {
                if !(self.optional)(&official.name) {
                    self.missing.push(official.name);
                }
                return param;
            };
            self.used.insert(official.name.clone());
            let values = match found.as_f32() {
                Some(values) if found.shape() == expected.as_slice() => values,
                _ => {
                    self.wrong_shape.push(format!(
                        "{} (file {:?}, model {:?})",
                        official.name,
                        found.shape(),
                        expected
                    ));
                    return param;
                }
            };
            // Every float parameter of SimMIM is trainable; callers freeze with `no_grad()`.
            let (id, _, mapper) = param.consume();
            let mut tensor: Tensor<B, D> =
                Tensor::from_data(TensorData::new(values.to_vec(), expected), &self.device);
            if official.transposed {
                tensor = tensor.transpose();
            }
            Param::from_mapped_value(id, tensor.require_grad(), mapper)
        }
    }

    let device = model.devices().into_iter().next().unwrap_or_default();
    let mut loader = Loader::<B> {
        tracker: PathTracker::default(),
        state,
        optional,
        device,
        used: BTreeSet::new(),
        missing: Vec::new(),
        wrong_shape: Vec::new(),
    };
    let model = model.map(&mut loader);
    let unexpected: Vec<String> = state
        .keys()
        .filter(|k| !loader.used.contains(*k) && !ignored(k))
        .cloned()
        .collect();
    if loader.missing.is_empty() && unexpected.is_empty() && loader.wrong_shape.is_empty() {
        Ok(model)
    } else {
        Err(ModelError::WeightMismatch {
            missing: loader.missing,
            unexpected,
            wrong_shape: loader.wrong_shape,
        })
    }
}

/// What [`load_pretrained`] did besides copying tensors, for the log.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PretrainedLoad {
    /// Relative-position tables interpolated to the classifier's window.
    pub resized: Vec<String>,
    /// Keys not used: the SimMIM head, derived buffers, a head for another class count.
    pub dropped: Vec<String>,
    /// Whether the classifier head came from the checkpoint (else it is freshly initialised).
    pub head_loaded: bool,
}

/// Loads an encoder into a classifier as the official `load_pretrained` does: from a SimMIM
/// checkpoint (`encoder.*` keys; the `decoder` is dropped) or an official classification
/// checkpoint (unprefixed keys; its `head` kept when the class count matches). Buffers are
/// derived, not loaded; Swin relative-position tables are resized by bicubic interpolation
/// when the window differs. Any other key that does not fit is an error naming it.
pub fn load_pretrained<B: Backend>(
    model: Classifier<B>,
    config: &SimMimConfig,
    state: StateDict,
) -> Result<(Classifier<B>, PretrainedLoad), ModelError> {
    let prefixed = state.keys().any(|k| k.starts_with("encoder."));
    let expected: HashMap<String, Vec<usize>> = parameters::<B, Classifier<B>>(&model)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    let mut report = PretrainedLoad::default();
    let mut kept = StateDict::new();
    for (key, tensor) in state {
        let name = if prefixed || key.starts_with("head.") {
            key.clone()
        } else {
            format!("encoder.{key}")
        };
        // Buffers follow from the geometry (and SwinV2's coordinates from the window being
        // fine-tuned at): recomputed, never carried over.
        let buffer = name.ends_with("relative_position_index")
            || name.ends_with("attn_mask")
            || name.ends_with("relative_coords_table");
        let foreign = !(name.starts_with("encoder.") || name.starts_with("head."));
        let other_head = name.starts_with("head.")
            && expected.get(&name).map(Vec::as_slice) != Some(tensor.shape());
        if buffer || foreign || other_head {
            report.dropped.push(key);
            continue;
        }
        let tensor = match (&config.encoder, expected.get(&name), &tensor) {
            (
                EncoderConfig::Swin(_),
                Some(shape),
                HostTensor::F32 {
                    shape: found,
                    values,
                },
            ) if name.ends_with("relative_position_bias_table")
                && found.len() == 2
                && shape.len() == 2
                && found[0] != shape[0] =>
            {
                if found[1] != shape[1] {
                    return Err(ModelError::WeightMismatch {
                        missing: vec![],
                        unexpected: vec![],
                        wrong_shape: vec![format!(
                            "{name}: {} heads in the checkpoint, {} in the model",
                            found[1], shape[1]
                        )],
                    });
                }
                report.resized.push(name.clone());
                HostTensor::F32 {
                    shape: shape.clone(),
                    values: resize_swin_table(values, found[1], shape[0]),
                }
            }
            _ => tensor,
        };
        kept.insert(name, tensor);
    }
    report.head_loaded = kept.contains_key("head.weight");
    let model = load_params(model, &kept, &|_| false, &|name| {
        name.starts_with("head.") || name == "encoder.mask_token"
    })?;
    Ok((model, report))
}

/// Every parameter (official name and layout) and every official buffer, ready to serialise.
pub fn state_dict<B: Backend, M: Module<B>>(
    model: &M,
    config: &SimMimConfig,
) -> Result<StateDict, ModelError> {
    struct Saver {
        tracker: PathTracker,
        out: StateDict,
        error: Option<ModelError>,
    }
    impl<B: Backend> ModuleVisitor<B> for Saver {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.tracker.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.error.is_some() {
                return;
            }
            let official = self.tracker.official();
            let mut tensor = param.val();
            if official.transposed {
                tensor = tensor.transpose();
            }
            let data = tensor.into_data();
            let shape = data.shape.to_vec();
            match crate::grads::host_values(data, || official.name.clone()) {
                Ok(values) => {
                    self.out
                        .insert(official.name, HostTensor::F32 { shape, values });
                }
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut saver = Saver {
        tracker: PathTracker::default(),
        out: official_buffers(config),
        error: None,
    };
    model.visit(&mut saver);
    match saver.error {
        Some(e) => Err(e),
        None => Ok(saver.out),
    }
}

/// Serialises a state dict to safetensors bytes, with the model config in the metadata:
/// the header, then each tensor's values written once into one buffer (the snapshot writer's
/// format, so every file this crate writes is laid out the same way).
pub fn to_safetensors(state: &StateDict, config: &SimMimConfig) -> Result<Vec<u8>, ModelError> {
    let entries: Vec<Entry> = state
        .iter()
        .map(|(name, tensor)| Entry::host(name, tensor))
        .collect();
    let mut out = start_file(&entries, config)?;
    for tensor in state.values() {
        push_host(&mut out, tensor);
    }
    Ok(out)
}

/// The model config stored in an exported file's metadata, if any.
pub fn config_from_safetensors(bytes: &[u8]) -> Result<Option<SimMimConfig>, ModelError> {
    let read_err = |reason: String| ModelError::Read {
        path: "<safetensors bytes>".to_string(),
        reason,
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| read_err(e.to_string()))?;
    match metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_METADATA_KEY))
    {
        Some(json) => serde_json::from_str(json)
            .map(Some)
            .map_err(|e| read_err(format!("metadata `{CONFIG_METADATA_KEY}`: {e}"))),
        None => Ok(None),
    }
}

/// Gradients by official name and in the official layout: for inspecting and comparing a
/// step against PyTorch.
pub fn gradient_state_dict<AB, M>(
    module: &M,
    grads: &burn::optim::GradientsParams,
) -> Result<StateDict, ModelError>
where
    AB: burn::tensor::backend::AutodiffBackend,
    M: burn::module::AutodiffModule<AB>,
{
    struct Collector<'a> {
        tracker: PathTracker,
        grads: &'a burn::optim::GradientsParams,
        out: StateDict,
        error: Option<ModelError>,
    }
    impl<AB: burn::tensor::backend::AutodiffBackend> ModuleVisitor<AB> for Collector<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.tracker.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if self.error.is_some() {
                return;
            }
            let Some(mut grad) = self.grads.get::<AB::InnerBackend, D>(param.id) else {
                return;
            };
            let official = self.tracker.official();
            if official.transposed {
                grad = grad.transpose();
            }
            let data = grad.into_data();
            let shape = data.shape.to_vec();
            match crate::grads::host_values(data, || format!("the gradient of {}", official.name)) {
                Ok(values) => {
                    self.out
                        .insert(official.name, HostTensor::F32 { shape, values });
                }
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut collector = Collector {
        tracker: PathTracker::default(),
        grads,
        out: StateDict::new(),
        error: None,
    };
    module.visit(&mut collector);
    match collector.error {
        Some(e) => Err(e),
        None => Ok(collector.out),
    }
}
