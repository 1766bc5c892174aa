//! Checkpoint bytes without stalling training or doubling memory. A snapshot of the model
//! and the AdamW state costs no copy (Burn tensors are reference-counted and never changed in
//! place while shared), so the step loop pays only for taking it; the snapshot is then
//! written as safetensors on another thread, straight into one buffer per file (the header
//! first, each tensor transposed on the fly where the official layout wants it), and every
//! tensor is released as soon as it is written. The writer's memory therefore stays near one
//! copy of the state: what is not written yet, plus what is.

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use crate::config::SimMimConfig;
use crate::error::ModelError;
use crate::optim::AdamW;
use crate::weights::naming::{parameters, ParamInfo};
use crate::weights::official_buffers;
use crate::weights::safetensors_writer::{push_f32, push_host, start_file, Entry};

/// The model and optimizer at one step, on the inner backend, ready to be written elsewhere.
pub struct Snapshot<B: Backend, M: Module<B>> {
    model: M,
    optimizer: Kept<B>,
    config: SimMimConfig,
}

/// The optimizer's part of a snapshot: its state, or its file already written (a sharded
/// optimizer's, assembled bucket by bucket as the ranks gathered it).
pub enum OptimizerPart<'a, B: Backend> {
    State(&'a AdamW<B>),
    Written(Vec<u8>),
}

impl<'a, B: Backend> From<&'a AdamW<B>> for OptimizerPart<'a, B> {
    fn from(optimizer: &'a AdamW<B>) -> Self {
        Self::State(optimizer)
    }
}

/// What a snapshot keeps of [`OptimizerPart`]: the state shared, not borrowed.
enum Kept<B: Backend> {
    State(Box<AdamW<B>>),
    Written(Vec<u8>),
}

impl<B: Backend, M: Module<B>> Snapshot<B, M> {
    /// Takes the snapshot: no tensor is copied.
    pub fn take<'a, AB>(
        model: &impl AutodiffModule<AB, InnerModule = M>,
        optimizer: impl Into<OptimizerPart<'a, B>>,
        config: &SimMimConfig,
    ) -> Self
    where
        AB: AutodiffBackend<InnerBackend = B>,
    {
        let optimizer = match optimizer.into() {
            OptimizerPart::State(state) => Kept::State(Box::new(state.clone())),
            OptimizerPart::Written(file) => Kept::Written(file),
        };
        Self {
            model: model.valid(),
            optimizer,
            config: config.clone(),
        }
    }

    /// `model.safetensors` and `optimizer.safetensors`, consuming the snapshot.
    pub fn into_safetensors(self) -> Result<(Vec<u8>, Vec<u8>), ModelError> {
        let params = parameters::<B, M>(&self.model);
        let moments = match self.optimizer {
            Kept::State(optimizer) => optimizer.into_moments(&params, &self.config)?,
            Kept::Written(bytes) => bytes,
        };
        let weights = model_safetensors(self.model, &params, &self.config)?;
        Ok((weights, moments))
    }
}

/// Runs `f` on a tensor's values as `f32`, borrowing them when they already are (no copy
/// of the largest tensors while the file is being written).
fn with_f32(data: TensorData, name: &str, f: impl FnOnce(&[f32])) -> Result<(), ModelError> {
    match data.as_slice::<f32>() {
        Ok(values) => f(values),
        Err(_) => f(&crate::grads::host_values(data, || name.to_string())?),
    }
    Ok(())
}

/// The model's safetensors (official names and buffers, the config in the metadata),
/// consuming the model: each parameter is released once written.
fn model_safetensors<B: Backend, M: Module<B>>(
    model: M,
    params: &[ParamInfo],
    config: &SimMimConfig,
) -> Result<Vec<u8>, ModelError> {
    let buffers = official_buffers(config);
    let mut entries: Vec<Entry> = buffers
        .iter()
        .map(|(name, tensor)| Entry::host(name, tensor))
        .collect();
    entries.extend(params.iter().map(|p| Entry::f32(&p.name, &p.shape)));
    let mut out = start_file(&entries, config)?;
    for tensor in buffers.values() {
        push_host(&mut out, tensor);
    }
    struct Writer<'a> {
        params: std::slice::Iter<'a, ParamInfo>,
        out: &'a mut Vec<u8>,
        error: Option<ModelError>,
    }
    impl<B: Backend> ModuleMapper<B> for Writer<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let device = tensor.device();
            match self.params.next() {
                Some(info) if self.error.is_none() => {
                    let dims = tensor.dims();
                    let transpose = (info.transposed && D == 2).then(|| (dims[0], dims[1]));
                    let written = with_f32(tensor.into_data(), &info.name, |values| {
                        push_f32(self.out, values, transpose)
                    });
                    if let Err(e) = written {
                        self.error = Some(e);
                    }
                }
                Some(_) => {}
                None => {
                    self.error = Some(ModelError::Write {
                        path: "<safetensors bytes>".into(),
                        reason: "the model has more parameters than it listed".into(),
                    })
                }
            }
            // The written tensor is released; an empty one keeps the module's shape of types.
            let empty = Tensor::<B, D>::empty([0; D], &device);
            Param::from_mapped_value(id, empty, mapper)
        }
    }
    let mut writer = Writer {
        params: params.iter(),
        out: &mut out,
        error: None,
    };
    let _released = model.map(&mut writer);
    if let Some(e) = writer.error {
        return Err(e);
    }
    Ok(out)
}

impl<B: Backend> AdamW<B> {
    /// `optimizer.safetensors` for the parameters `params` (official names and layouts, as
    /// [`AdamW::state_dict`] names them), consuming the state: each moment is released once
    /// written.
    pub fn into_moments(
        self,
        params: &[ParamInfo],
        config: &SimMimConfig,
    ) -> Result<Vec<u8>, ModelError> {
        if let Some(shard) = &self.shard {
            return Err(shard.partial("the optimizer file"));
        }
        let (steps, mut moments) = self.into_parts();
        let present: Vec<&ParamInfo> = params
            .iter()
            .filter(|p| moments.contains_key(&p.id))
            .collect();
        let mut file = MomentsFile::start(steps, &present, config)?;
        for info in present {
            let Some((first, second)) = moments.remove(&info.id) else {
                continue;
            };
            for (suffix, moment) in [("exp_avg", first), ("exp_avg_sq", second)] {
                let name = format!("{}.{suffix}", info.name);
                with_f32(moment.into_data(), &name, |values| file.push(info, values))?;
            }
        }
        file.finish()
    }
}

/// `optimizer.safetensors` written moment by moment into one buffer: the header first (every
/// parameter's `exp_avg` then `exp_avg_sq`, in the order given), then each moment as it is
/// pushed, in that order.
pub struct MomentsFile {
    out: Vec<u8>,
    /// The file's length once every moment the header lists is pushed.
    expected: usize,
}

impl MomentsFile {
    /// The header for the moments of `present` and the step count.
    pub fn start(
        steps: u64,
        present: &[&ParamInfo],
        config: &SimMimConfig,
    ) -> Result<Self, ModelError> {
        let mut entries = vec![Entry {
            name: "step".into(),
            dtype: "I64",
            shape: vec![1],
        }];
        for info in present {
            for suffix in ["exp_avg", "exp_avg_sq"] {
                entries.push(Entry::f32(format!("{}.{suffix}", info.name), &info.shape));
            }
        }
        let mut out = start_file(&entries, config)?;
        out.extend_from_slice(&(steps as i64).to_le_bytes());
        let values: usize = present
            .iter()
            .map(|p| 2 * p.shape.iter().product::<usize>())
            .sum();
        let expected = out.len() + 4 * values;
        Ok(Self { out, expected })
    }

    /// The next moment: `info`'s values flat in Burn's order (a transposed weight's are
    /// `[in, out]`), written in the official layout.
    pub fn push(&mut self, info: &ParamInfo, values: &[f32]) {
        let transpose = info.transposed.then(|| (info.shape[1], info.shape[0]));
        push_f32(&mut self.out, values, transpose);
    }

    /// The file; fails when the moments pushed do not fill what the header lists.
    pub fn finish(self) -> Result<Vec<u8>, ModelError> {
        if self.out.len() != self.expected {
            return Err(ModelError::Write {
                path: "optimizer.safetensors".into(),
                reason: format!(
                    "{} bytes written where the header lists {}",
                    self.out.len(),
                    self.expected
                ),
            });
        }
        Ok(self.out)
    }
}
