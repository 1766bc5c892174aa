//! AdamW exactly as `torch.optim.AdamW` with the official SimMIM parameter groups and
//! `clip_grad_norm_` over the global gradient norm.
//!
//! Burn 0.21 has neither parameter groups nor global-norm clipping, and its AdamW defaults
//! differ from PyTorch's, so the update is written out here over Burn's gradient map. The
//! moments are kept flat per parameter on the device, keyed by parameter id.

pub mod layer_decay;
pub mod shard;

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::backend::{float, AdamWUpdate, SimMimBackend};
use crate::error::ModelError;
use crate::weights::naming::{parameters, takes_weight_decay, PathTracker};
use crate::weights::{HostTensor, StateDict};
use shard::ShardState;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Max global gradient norm (`TRAIN.CLIP_GRAD`); `None` disables clipping.
    pub clip_grad: Option<f64>,
}

impl Default for AdamWConfig {
    /// The official SimMIM pretraining settings.
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.05,
            clip_grad: Some(5.0),
        }
    }
}

#[derive(Clone)]
struct Moments<B: Backend> {
    first: Tensor<B, 1>,
    second: Tensor<B, 1>,
}

/// Optimizer state over the inner (non-autodiff) backend `B`. Cloning it copies no tensor.
#[derive(Clone)]
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    steps: u64,
    moments: HashMap<ParamId, Moments<B>>,
    /// Learning-rate multipliers by official name (layer-wise decay); absent: 1.
    lr_scales: HashMap<String, f64>,
    /// With optimizer-state sharding (ZeRO-1): which values this rank updates; the moments
    /// then hold those values only.
    pub(crate) shard: Option<ShardState>,
}

/// What one optimizer step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradient before clipping (what `clip_grad_norm_` returns).
    pub grad_norm: f64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            moments: HashMap::new(),
            lr_scales: HashMap::new(),
            shard: None,
        }
    }

    /// Per-parameter learning-rate multipliers (by official name), as torch parameter groups
    /// with their own `lr` give them: weight decay scales with them too.
    pub fn with_lr_scales(mut self, scales: HashMap<String, f64>) -> Self {
        self.lr_scales = scales;
        self
    }

    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// The f32 values the moments hold on this rank (both moments together): what the
    /// optimizer state costs this rank, sharded or not.
    pub fn moment_floats(&self) -> usize {
        self.moments
            .values()
            .map(|m| m.first.dims()[0] + m.second.dims()[0])
            .sum()
    }

    /// The step count and each parameter's (first, second) moments.
    #[allow(clippy::type_complexity)]
    pub(crate) fn into_parts(self) -> (u64, HashMap<ParamId, (Tensor<B, 1>, Tensor<B, 1>)>) {
        let moments = self
            .moments
            .into_iter()
            .map(|(id, m)| (id, (m.first, m.second)))
            .collect();
        (self.steps, moments)
    }

    /// The optimizer state for a checkpoint: `<param>.exp_avg` and `<param>.exp_avg_sq` under
    /// the official parameter names and layouts (as `torch.optim.AdamW` calls its moments),
    /// and `step`.
    pub fn state_dict<AB, M>(&self, module: &M) -> Result<StateDict, ModelError>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        if let Some(shard) = &self.shard {
            return Err(shard.partial("state_dict"));
        }
        let mut out = StateDict::new();
        out.insert(
            "step".to_string(),
            HostTensor::I64 {
                shape: vec![1],
                values: vec![self.steps as i64],
            },
        );
        for info in parameters::<AB, M>(module) {
            let Some(moments) = self.moments.get(&info.id) else {
                continue;
            };
            for (suffix, moment) in [("exp_avg", &moments.first), ("exp_avg_sq", &moments.second)] {
                let mut values = crate::grads::host_values(moment.clone().into_data(), || {
                    format!("the AdamW {suffix} of {}", info.name)
                })?;
                if info.transposed {
                    // Burn keeps Linear weights [in, out]; the official layout is [out, in].
                    let (rows, cols) = (info.shape[1], info.shape[0]);
                    values = transpose(&values, rows, cols);
                }
                out.insert(
                    format!("{}.{suffix}", info.name),
                    HostTensor::F32 {
                        shape: info.shape.clone(),
                        values,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Restores what [`Self::state_dict`] wrote, for `module`'s parameters on `device`.
    /// Moments for unknown parameters or of the wrong size fail the whole load, listed. A
    /// sharded optimizer keeps its own values of each moment only: a checkpoint of any world
    /// size, sharded or not, loads.
    pub fn load_state_dict<AB, M>(
        &mut self,
        module: &M,
        state: &StateDict,
        device: &B::Device,
    ) -> Result<(), ModelError>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let params = parameters::<AB, M>(module);
        if let Some(shard) = &mut self.shard {
            shard.check_module(params.len())?;
        }
        let mut moments = HashMap::new();
        let mut stepped = vec![false; params.len()];
        let (mut missing, mut wrong_shape) = (Vec::new(), Vec::new());
        let mut expected: Vec<String> = vec!["step".to_string()];
        for (index, info) in params.iter().enumerate() {
            let first = state.get(&format!("{}.exp_avg", info.name));
            let second = state.get(&format!("{}.exp_avg_sq", info.name));
            expected.push(format!("{}.exp_avg", info.name));
            expected.push(format!("{}.exp_avg_sq", info.name));
            let (first, second) = match (first, second) {
                (
                    Some(HostTensor::F32 {
                        shape: s1,
                        values: v1,
                    }),
                    Some(HostTensor::F32 {
                        shape: s2,
                        values: v2,
                    }),
                ) if *s1 == info.shape && *s2 == info.shape => (v1, v2),
                (None, None) => continue, // a parameter the optimizer has not stepped yet
                (None, _) | (_, None) => {
                    missing.push(info.name.clone());
                    continue;
                }
                _ => {
                    wrong_shape.push(info.name.clone());
                    continue;
                }
            };
            stepped[index] = true;
            let owned = match &self.shard {
                Some(shard) => shard.layout.places()[index].owned.clone(),
                None => 0..first.len(),
            };
            if owned.is_empty() {
                continue;
            }
            let to_burn = |values: &[f32]| {
                let values = if info.transposed {
                    transpose(values, info.shape[0], info.shape[1])
                } else {
                    values.to_vec()
                };
                let values = values[owned.clone()].to_vec();
                let len = values.len();
                Tensor::<B, 1>::from_data(TensorData::new(values, [len]), device)
            };
            moments.insert(
                info.id,
                Moments {
                    first: to_burn(first),
                    second: to_burn(second),
                },
            );
        }
        let unexpected: Vec<String> = state
            .keys()
            .filter(|k| !expected.contains(k))
            .cloned()
            .collect();
        let steps = match state.get("step") {
            Some(HostTensor::I64 { values, .. }) if values.len() == 1 && values[0] >= 0 => {
                values[0] as u64
            }
            _ => {
                missing.push("step".to_string());
                0
            }
        };
        if !(missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty()) {
            return Err(ModelError::WeightMismatch {
                missing,
                unexpected,
                wrong_shape,
            });
        }
        self.steps = steps;
        self.moments = moments;
        if let Some(shard) = &mut self.shard {
            shard.stepped = stepped;
        }
        Ok(())
    }

    /// Global L2 norm of all gradients of `module`'s parameters; one device sync.
    pub fn global_norm<AB, M>(module: &M, grads: &GradientsParams) -> f64
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        struct SquaredNorms<'a, B: Backend> {
            grads: &'a GradientsParams,
            parts: Vec<Tensor<B, 1>>,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for SquaredNorms<'_, AB::InnerBackend> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                if let Some(grad) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                    self.parts.push(grad.square().sum());
                }
            }
        }
        let mut visitor = SquaredNorms::<B> {
            grads,
            parts: Vec::new(),
        };
        module.visit(&mut visitor);
        if visitor.parts.is_empty() {
            return 0.0;
        }
        let total: f64 = Tensor::cat(visitor.parts, 0).sum().into_scalar().elem();
        total.sqrt()
    }

    /// One AdamW step at learning rate `lr`: clip by the global norm, decay the decay group,
    /// update every parameter that has a gradient. Consumes the gradients.
    pub fn step<AB, M>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        B: SimMimBackend,
        M: AutodiffModule<AB>,
    {
        debug_assert!(
            self.shard.is_none(),
            "a sharded optimizer steps with step_shard"
        );
        let grad_norm = Self::global_norm::<AB, M>(&module, &grads);
        let rule = StepRule::next(&self.config, &mut self.steps, lr, grad_norm);
        let mut updater = Updater::<B> {
            tracker: PathTracker::default(),
            grads: &mut grads,
            moments: &mut self.moments,
            lr_scales: &self.lr_scales,
            rule,
        };
        let module = module.map(&mut updater);
        (module, StepStats { grad_norm })
    }
}

/// One step's settings: what every parameter shares, and what [`StepRule::for_parameter`]
/// derives per parameter (its weight decay and learning-rate scale).
struct StepRule {
    lr: f64,
    bias_correction1: f64,
    weight_decay: f64,
    shared: AdamWUpdate,
}

impl StepRule {
    /// Counts a step in `steps` and returns what its updates share, given the global
    /// gradient norm.
    fn next(config: &AdamWConfig, steps: &mut u64, lr: f64, grad_norm: f64) -> Self {
        let clip_scale = match config.clip_grad {
            // torch: coef = max_norm / (norm + 1e-6), applied only when below 1.
            Some(max_norm) => (max_norm / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        *steps += 1;
        let (beta1, beta2) = config.betas;
        let t = *steps as i32;
        StepRule {
            lr,
            bias_correction1: 1.0 - beta1.powi(t),
            weight_decay: config.weight_decay,
            shared: AdamWUpdate {
                grad_scale: clip_scale,
                beta1,
                beta2,
                decay_factor: 1.0,
                step_size: 0.0,
                bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
                eps: config.eps,
            },
        }
    }

    /// The update of the parameter with this official name and (official) shape.
    fn for_parameter(
        &self,
        official_name: &str,
        official_shape: &[usize],
        lr_scales: &HashMap<String, f64>,
    ) -> AdamWUpdate {
        let decay = takes_weight_decay(official_name, official_shape);
        let lr = self.lr * lr_scales.get(official_name).copied().unwrap_or(1.0);
        AdamWUpdate {
            decay_factor: if decay && self.weight_decay != 0.0 {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            },
            step_size: lr / self.bias_correction1,
            ..self.shared
        }
    }
}

struct Updater<'a, B: Backend> {
    tracker: PathTracker,
    grads: &'a mut GradientsParams,
    moments: &'a mut HashMap<ParamId, Moments<B>>,
    lr_scales: &'a HashMap<String, f64>,
    rule: StepRule,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Updater<'_, AB::InnerBackend>
where
    AB::InnerBackend: SimMimBackend,
{
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.tracker.exit(container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape = tensor.dims();
        let official = self.tracker.official();
        let mut official_shape = shape.to_vec();
        if official.transposed {
            official_shape.reverse();
        }
        let update = self
            .rule
            .for_parameter(&official.name, &official_shape, self.lr_scales);
        let count: usize = shape.iter().product();
        let flat = |t: Tensor<AB::InnerBackend, 1>| t.into_primitive().tensor();
        let moments = self
            .moments
            .remove(&id)
            .map(|Moments { first, second }| (flat(first), flat(second)));
        let [value, first, second] = <AB::InnerBackend as SimMimBackend>::adamw_update(
            flat(tensor.inner().reshape([count])),
            flat(grad.reshape([count])),
            moments,
            &update,
        )
        .map(float::<AB::InnerBackend, 1>);
        self.moments.insert(id, Moments { first, second });

        let updated = Tensor::<AB, D>::from_inner(value.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

use burn::tensor::ElementConversion;

/// A row-major `[rows, cols]` matrix transposed to `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
