//! Optimizer-state sharding (ZeRO-1): each of N ranks keeps the AdamW moments of 1/N of the
//! values and updates only those; the transport reduce-scatters the gradients to their owners
//! and all-gathers the updated weights.
//!
//! The shards follow the gradient buckets (see [`crate::grads::buckets`]): each bucket is
//! padded to a multiple of the world and cut into equal chunks, chunk `r` belonging to rank
//! `r`. Equal chunks are what NCCL's reduce-scatter and all-gather take, and every bucket then
//! costs each link the same `(N-1)/N` of its size as the two halves of an all-reduce, so
//! sharding adds no traffic. A chunk may cut a parameter: the moments are kept per parameter
//! for the values this rank owns, which keeps AdamW's per-parameter rules (weight decay,
//! layer-wise learning rates) exact.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::{AdamW, Moments, StepRule, StepStats};
use crate::backend::{float, SimMimBackend};
use crate::config::SimMimConfig;
use crate::error::ModelError;
use crate::grads::buckets::{parameter_sizes, plan};
use crate::grads::host_values;
use crate::weights::naming::{parameters, ParamInfo};
use crate::weights::snapshot::MomentsFile;

/// Where each parameter's values sit in the buckets and which of them this rank owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    world: usize,
    rank: usize,
    /// Per bucket: its length (whole parameters) and the chunk each rank owns of it.
    buckets: Vec<(usize, usize)>,
    /// Per parameter, in the module's visiting order.
    places: Vec<Place>,
}

/// One parameter's place in the buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub bucket: usize,
    /// Where the parameter's first value sits in its bucket.
    pub offset: usize,
    pub size: usize,
    /// The parameter's values this rank owns, as indices into the flat parameter.
    pub owned: Range<usize>,
}

impl ShardLayout {
    /// The layout of parameters of `sizes` (visiting order) in buckets of at most `limit`
    /// values, for `rank` of `world`.
    pub fn new(sizes: &[usize], limit: usize, world: usize, rank: usize) -> Self {
        let world = world.max(1);
        let mut buckets = Vec::new();
        let mut places = Vec::with_capacity(sizes.len());
        for (bucket, range) in plan(sizes, limit).into_iter().enumerate() {
            let len: usize = sizes[range.clone()].iter().sum();
            let chunk = len.div_ceil(world);
            let mine = rank * chunk..(rank + 1) * chunk;
            let mut offset = 0;
            for &size in &sizes[range] {
                let clip = |at: usize| at.clamp(offset, offset + size) - offset;
                places.push(Place {
                    bucket,
                    offset,
                    size,
                    owned: clip(mine.start)..clip(mine.end),
                });
                offset += size;
            }
            buckets.push((len, chunk));
        }
        Self {
            world,
            rank,
            buckets,
            places,
        }
    }

    pub fn for_module<B: AutodiffBackend, M: AutodiffModule<B>>(
        module: &M,
        limit: usize,
        world: usize,
        rank: usize,
    ) -> Self {
        Self::new(&parameter_sizes::<B, M>(module), limit, world, rank)
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// The values of bucket `b` (whole parameters, no padding).
    pub fn bucket_len(&self, b: usize) -> usize {
        self.buckets[b].0
    }

    /// Bucket `b`'s length padded to a multiple of the world.
    pub fn padded_len(&self, b: usize) -> usize {
        self.buckets[b].1 * self.world
    }

    /// This rank's chunk of bucket `b`, as indices into the padded bucket.
    pub fn own_chunk(&self, b: usize) -> Range<usize> {
        let chunk = self.buckets[b].1;
        self.rank * chunk..(self.rank + 1) * chunk
    }

    pub fn places(&self) -> &[Place] {
        &self.places
    }

    /// The parameter values this rank owns, over all buckets.
    pub fn owned_values(&self) -> usize {
        self.places.iter().map(|p| p.owned.len()).sum()
    }

    /// Parameter indices (visiting order) of bucket `b`.
    fn in_bucket(&self, b: usize) -> impl Iterator<Item = (usize, &Place)> {
        self.places
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.bucket == b)
    }
}

/// A sharded optimizer's own bookkeeping.
#[derive(Clone)]
pub(crate) struct ShardState {
    pub(super) layout: ShardLayout,
    /// Per parameter: whether any rank holds moments for it (it has had a gradient). Every
    /// rank knows this for every parameter, so the gathered state lists the same ones.
    pub(super) stepped: Vec<bool>,
}

impl ShardState {
    /// Refuses a module whose parameters the layout was not made for.
    pub(super) fn check_module(&self, parameters: usize) -> Result<(), ModelError> {
        if parameters == self.layout.places.len() {
            return Ok(());
        }
        Err(ModelError::Config {
            field: "train.zero".into(),
            reason: format!(
                "the shard layout covers {} parameters, the model has {parameters}",
                self.layout.places.len()
            ),
        })
    }

    /// The error for asking a shard for what only the whole state has.
    pub(crate) fn partial(&self, what: &str) -> ModelError {
        ModelError::Config {
            field: "train.zero".into(),
            reason: format!(
                "{what} of a sharded optimizer (rank {} of {}) needs the moments gathered first",
                self.layout.rank, self.layout.world
            ),
        }
    }
}

/// The error for asking an optimizer that is not sharded for `what` only a shard has.
fn not_sharded(what: &str) -> ModelError {
    ModelError::Config {
        field: "train.zero".into(),
        reason: format!("{what} needs a sharded optimizer; this one is not sharded"),
    }
}

/// Every parameter's values flat, in visiting order (clones share the device memory).
fn flat_values<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
) -> Vec<Tensor<AB::InnerBackend, 1>> {
    struct Values<B: Backend>(Vec<Tensor<B, 1>>);
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Values<AB::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let value = param.val().inner();
            let n = value.shape().num_elements();
            self.0.push(value.reshape([n]));
        }
    }
    let mut values = Values(Vec::new());
    module.visit(&mut values);
    values.0
}

/// The pieces of one chunk, in order, padded with zeros to `chunk` values.
fn fill_chunk<B: Backend>(
    mut pieces: Vec<Tensor<B, 1>>,
    chunk: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    let filled: usize = pieces.iter().map(|p| p.dims()[0]).sum();
    if filled < chunk || pieces.is_empty() {
        pieces.push(Tensor::zeros([chunk - filled], device));
    }
    Tensor::cat(pieces, 0)
}

impl<B: Backend> AdamW<B> {
    /// Shards this optimizer by `layout` (before it has moments: call before loading a
    /// checkpoint, which then keeps this rank's values only).
    pub fn with_shard(mut self, layout: ShardLayout) -> Self {
        let stepped = vec![false; layout.places.len()];
        self.moments = HashMap::new();
        self.shard = Some(ShardState { layout, stepped });
        self
    }

    pub fn shard_layout(&self) -> Option<&ShardLayout> {
        self.shard.as_ref().map(|s| &s.layout)
    }

    /// One AdamW step over this rank's values: `grad_chunks` holds, per bucket, this rank's
    /// chunk of the averaged gradients, `has_grad` which parameters have one (the others are
    /// left as they are, as [`AdamW::step`] leaves them), and `grad_norm` the global norm
    /// over all ranks. Returns, per bucket, this rank's chunk of the updated weights, for the
    /// all-gather.
    pub fn step_shard<AB, M>(
        &mut self,
        lr: f64,
        module: &M,
        (grad_chunks, has_grad): (&[Tensor<B, 1>], &[bool]),
        grad_norm: f64,
        device: &B::Device,
    ) -> Result<(Vec<Tensor<B, 1>>, StepStats), ModelError>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        B: SimMimBackend,
        M: AutodiffModule<AB>,
    {
        let infos = parameters::<AB, M>(module);
        let values = flat_values::<AB, M>(module);
        let shard = self
            .shard
            .as_mut()
            .ok_or_else(|| not_sharded("a sharded step"))?;
        shard.check_module(infos.len())?;
        if has_grad.len() != infos.len() || grad_chunks.len() != shard.layout.bucket_count() {
            return Err(ModelError::Config {
                field: "train.zero".into(),
                reason: format!(
                    "{} gradient chunks and {} gradient flags for {} buckets and {} parameters",
                    grad_chunks.len(),
                    has_grad.len(),
                    shard.layout.bucket_count(),
                    infos.len()
                ),
            });
        }
        let rule = StepRule::next(&self.config, &mut self.steps, lr, grad_norm);
        for (stepped, &has) in shard.stepped.iter_mut().zip(has_grad) {
            *stepped |= has;
        }
        let layout = &shard.layout;
        let flat = |t: Tensor<B, 1>| t.into_primitive().tensor();
        let mut chunks = Vec::with_capacity(layout.bucket_count());
        for (b, grad_chunk) in grad_chunks.iter().enumerate() {
            let chunk_start = layout.own_chunk(b).start;
            let mut pieces = Vec::new();
            for (i, place) in layout.in_bucket(b) {
                if place.owned.is_empty() {
                    continue;
                }
                let value = values[i].clone().slice(place.owned.clone());
                if !has_grad[i] {
                    pieces.push(value);
                    continue;
                }
                let info = &infos[i];
                let update = rule.for_parameter(&info.name, &info.shape, &self.lr_scales);
                let from = place.offset + place.owned.start - chunk_start;
                let grad = grad_chunk.clone().slice(from..from + place.owned.len());
                let moments = self
                    .moments
                    .remove(&info.id)
                    .map(|Moments { first, second }| (flat(first), flat(second)));
                let [value, first, second] =
                    B::adamw_update(flat(value), flat(grad), moments, &update).map(float::<B, 1>);
                self.moments.insert(info.id, Moments { first, second });
                pieces.push(value);
            }
            chunks.push(fill_chunk(pieces, layout.own_chunk(b).len(), device));
        }
        Ok((chunks, StepStats { grad_norm }))
    }

    /// This rank's chunk of bucket `b` of both moments (zeros where it holds none), for the
    /// all-gather that assembles the whole state for a checkpoint.
    pub fn moment_chunks<AB, M>(
        &self,
        module: &M,
        b: usize,
        device: &B::Device,
    ) -> Result<[Tensor<B, 1>; 2], ModelError>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let shard = self
            .shard
            .as_ref()
            .ok_or_else(|| not_sharded("moment chunks"))?;
        let infos = parameters::<AB, M>(module);
        shard.check_module(infos.len())?;
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for (i, place) in shard.layout.in_bucket(b) {
            let n = place.owned.len();
            if n == 0 {
                continue;
            }
            match self.moments.get(&infos[i].id) {
                Some(m) => {
                    first.push(m.first.clone());
                    second.push(m.second.clone());
                }
                None => {
                    first.push(Tensor::zeros([n], device));
                    second.push(Tensor::zeros([n], device));
                }
            }
        }
        let chunk = shard.layout.own_chunk(b).len();
        Ok([
            fill_chunk(first, chunk, device),
            fill_chunk(second, chunk, device),
        ])
    }

    /// The writer of the whole `optimizer.safetensors` (official unsharded layout, as an
    /// unsharded optimizer writes it) from the gathered moments, bucket by bucket: rank 0
    /// never holds more than one gathered bucket of each moment on its device.
    pub fn gathered_file<AB, M>(
        &self,
        module: &M,
        config: &SimMimConfig,
    ) -> Result<GatheredFile, ModelError>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let shard = self
            .shard
            .as_ref()
            .ok_or_else(|| not_sharded("gathering"))?;
        let infos = parameters::<AB, M>(module);
        shard.check_module(infos.len())?;
        let present: Vec<&ParamInfo> = infos
            .iter()
            .zip(&shard.stepped)
            .filter_map(|(info, &stepped)| stepped.then_some(info))
            .collect();
        let file = MomentsFile::start(self.steps, &present, config)?;
        Ok(GatheredFile {
            file,
            infos,
            places: shard.layout.places.clone(),
            stepped: shard.stepped.clone(),
            next_bucket: 0,
        })
    }
}

/// `optimizer.safetensors` being assembled from gathered moment buckets (see
/// [`AdamW::gathered_file`]).
pub struct GatheredFile {
    file: MomentsFile,
    infos: Vec<ParamInfo>,
    places: Vec<Place>,
    stepped: Vec<bool>,
    next_bucket: usize,
}

impl GatheredFile {
    /// Writes bucket `b`'s moments from both gathered (padded) buckets; buckets in order.
    pub fn push_bucket<B: Backend>(
        &mut self,
        b: usize,
        [first, second]: [Tensor<B, 1>; 2],
    ) -> Result<(), ModelError> {
        if b != self.next_bucket {
            return Err(ModelError::Write {
                path: "optimizer.safetensors".into(),
                reason: format!(
                    "gathered bucket {b} arrived where {} was due",
                    self.next_bucket
                ),
            });
        }
        self.next_bucket += 1;
        let what = |m: &'static str| move || format!("gathered {m} bucket {b}");
        let first = host_values(first.into_data(), what("exp_avg"))?;
        let second = host_values(second.into_data(), what("exp_avg_sq"))?;
        for ((info, place), &stepped) in self.infos.iter().zip(&self.places).zip(&self.stepped) {
            if place.bucket != b || !stepped {
                continue;
            }
            let span = place.offset..place.offset + place.size;
            for values in [&first, &second] {
                let values = values.get(span.clone()).ok_or_else(|| ModelError::Write {
                    path: "optimizer.safetensors".into(),
                    reason: format!("gathered bucket {b} is shorter than {}", info.name),
                })?;
                self.file.push(info, values);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Vec<u8>, ModelError> {
        self.file.finish()
    }
}

/// `module` with every parameter of bucket `b` that `has_grad` marks taken from that bucket's
/// gathered weights (padded, as the all-gather leaves them); the others are kept. Applied
/// bucket by bucket, so the old weights are released as the new ones arrive instead of the
/// model being held twice.
pub fn params_from_bucket<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: M,
    b: usize,
    bucket: &Tensor<AB::InnerBackend, 1>,
    layout: &ShardLayout,
    has_grad: &[bool],
) -> M {
    struct Replace<'a, B: Backend> {
        bucket: &'a Tensor<B, 1>,
        b: usize,
        places: std::iter::Zip<std::slice::Iter<'a, Place>, std::slice::Iter<'a, bool>>,
    }
    impl<AB: AutodiffBackend> ModuleMapper<AB> for Replace<'_, AB::InnerBackend> {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<AB, D>>,
        ) -> Param<Tensor<AB, D>> {
            let Some((place, true)) = self.places.next() else {
                return param;
            };
            if place.bucket != self.b {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.dims();
            drop(tensor);
            let value = self
                .bucket
                .clone()
                .slice(place.offset..place.offset + place.size)
                .reshape(shape);
            let updated = Tensor::<AB, D>::from_inner(value).require_grad();
            Param::from_mapped_value(id, updated, mapper)
        }
    }
    let mut replace = Replace::<AB::InnerBackend> {
        bucket,
        b,
        places: layout.places.iter().zip(has_grad),
    };
    module.map(&mut replace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_equal_cover_every_value_once_and_cut_parameters_where_they_fall() {
        let sizes = [5, 3, 9, 2, 7];
        for world in 1..=4 {
            let layouts: Vec<ShardLayout> = (0..world)
                .map(|rank| ShardLayout::new(&sizes, 10, world, rank))
                .collect();
            // Buckets of whole parameters: [5, 3], [9], [2, 7].
            assert_eq!(layouts[0].bucket_count(), 3);
            for (i, &size) in sizes.iter().enumerate() {
                let mut owners = vec![0; size];
                for layout in &layouts {
                    for v in layout.places()[i].owned.clone() {
                        owners[v] += 1;
                    }
                }
                assert!(owners.iter().all(|&n| n == 1), "world {world} param {i}");
            }
            for b in 0..3 {
                let padded = layouts[0].padded_len(b);
                assert!(padded.is_multiple_of(world) && padded >= layouts[0].bucket_len(b));
                assert!(padded < layouts[0].bucket_len(b) + world);
                for (rank, layout) in layouts.iter().enumerate() {
                    assert_eq!(layout.own_chunk(b).len() * world, padded);
                    assert_eq!(layout.own_chunk(b).start, rank * padded / world);
                }
            }
            let total: usize = layouts.iter().map(ShardLayout::owned_values).sum();
            assert_eq!(total, sizes.iter().sum::<usize>());
        }
        // World 3, bucket [5, 3] (8 values, chunks of 3): rank 1 owns values 3..6, that is
        // the last two of the first parameter and the first of the second.
        let layout = ShardLayout::new(&sizes, 10, 3, 1);
        assert_eq!(layout.places()[0].owned, 3..5);
        assert_eq!(layout.places()[1].owned, 0..1);
        assert_eq!(layout.own_chunk(0), 3..6);
        // Rank 2 owns values 6..9 of 8: two values and a padding slot.
        let layout = ShardLayout::new(&sizes, 10, 3, 2);
        assert_eq!(layout.places()[1].owned, 1..3);
        assert_eq!(layout.places()[0].owned, 5..5);
    }

    #[test]
    fn more_ranks_than_values_leaves_some_ranks_nothing_of_a_bucket() {
        let layout = ShardLayout::new(&[2], 10, 4, 3);
        assert_eq!(layout.padded_len(0), 4);
        assert_eq!(layout.own_chunk(0), 3..4);
        assert!(layout.places()[0].owned.is_empty());
    }
}

#[cfg(test)]
mod against_unsharded {
    use burn::backend::Autodiff;
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use burn::tensor::TensorData;
    use burn_flex::Flex;

    use super::*;
    use crate::grads::buckets::{flatten_buckets, has_gradient, unflatten_buckets};
    use crate::grads::host_values;
    use crate::weights::{state_dict, state_dict_from_safetensors, HostTensor};
    use crate::{AdamWConfig, InitModel, SimMim, SimMimConfig};

    type B = Autodiff<Flex>;
    const MASK_TOKEN: &str = "encoder.mask_token";

    fn host(t: &Tensor<Flex, 1>) -> Vec<f32> {
        host_values(t.clone().into_data(), || "tensor".into()).expect("read")
    }

    /// Gradients that change every step, with the mask token's left out (a parameter without
    /// a gradient must be left alone, as the unsharded step leaves it).
    fn gradients(model: &SimMim<B>, step: usize) -> GradientsParams {
        let mask_token = parameters::<B, _>(model)
            .into_iter()
            .find(|p| p.name == MASK_TOKEN)
            .expect("the mask token");
        let n = model.num_params();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + step * 13) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let flat = Tensor::<Flex, 1>::from_data(TensorData::new(values, [n]), &Default::default());
        let (mut grads, _) =
            unflatten_buckets::<B, _>(model, &[flat], usize::MAX, 0).expect("grads");
        grads.remove::<Flex, 3>(mask_token.id);
        grads
    }

    fn max_relative_gap(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
            .fold(0.0, f32::max)
    }

    #[test]
    fn three_ranks_sharing_the_state_step_as_one_optimizer_and_gather_its_state() {
        let config = SimMimConfig::preset("swin_micro").expect("preset");
        let device = Default::default();
        let model = config.init::<B>(0, &device).expect("model");
        let adamw = AdamWConfig {
            clip_grad: Some(1.0),
            ..AdamWConfig::default()
        };
        let (world, limit) = (3, 20_000);
        let layouts: Vec<ShardLayout> = (0..world)
            .map(|rank| ShardLayout::for_module::<B, _>(&model, limit, world, rank))
            .collect();
        assert!(layouts[0].bucket_count() > 3);
        // Layer-wise learning rates (fine-tuning's) must follow each value to its owner.
        let scales: HashMap<String, f64> =
            [("encoder.norm.weight", 0.1), ("decoder.0.weight", 0.5)]
                .into_iter()
                .map(|(name, scale)| (name.to_string(), scale))
                .collect();
        let optimizer = || AdamW::<Flex>::new(adamw).with_lr_scales(scales.clone());
        let mut whole = optimizer();
        let mut shards: Vec<AdamW<Flex>> = layouts
            .iter()
            .map(|l| optimizer().with_shard(l.clone()))
            .collect();
        let (mut unsharded, mut sharded) = (model.clone(), model);
        for step in 0..3 {
            let lr = 1e-3 * (step + 1) as f64;
            let grads = gradients(&unsharded, step);
            let norm = AdamW::<Flex>::global_norm::<B, _>(&unsharded, &grads);
            let has_grad = has_gradient::<B, _>(&sharded, &grads);
            assert_eq!(has_grad.iter().filter(|&&g| !g).count(), 1);
            let buckets = flatten_buckets::<B, _>(&sharded, grads, limit, &[], &device);
            let again = gradients(&unsharded, step);
            (unsharded, _) = whole.step(lr, unsharded, again);
            // Each rank's chunks as a reduce-scatter leaves them, updated and all-gathered.
            let mut gathered: Vec<Vec<Tensor<Flex, 1>>> = vec![Vec::new(); buckets.len()];
            for (layout, shard) in layouts.iter().zip(&mut shards) {
                let chunks: Vec<Tensor<Flex, 1>> = buckets
                    .iter()
                    .enumerate()
                    .map(|(b, bucket)| {
                        let padded =
                            fill_chunk(vec![bucket.clone()], layout.padded_len(b), &device);
                        padded.slice(layout.own_chunk(b))
                    })
                    .collect();
                let (own, stats) = shard
                    .step_shard::<B, _>(lr, &sharded, (&chunks, &has_grad), norm, &device)
                    .expect("sharded step");
                assert_eq!(stats.grad_norm, norm);
                for (b, chunk) in own.into_iter().enumerate() {
                    gathered[b].push(chunk);
                }
            }
            for (b, chunks) in gathered.into_iter().enumerate() {
                let bucket = Tensor::cat(chunks, 0);
                sharded = params_from_bucket::<B, _>(sharded, b, &bucket, &layouts[0], &has_grad);
            }
        }
        let initial = config.init::<B>(0, &device).expect("model");
        let initial = state_dict(&initial, &config).expect("state");
        let (a, b) = (
            state_dict(&unsharded, &config).expect("state"),
            state_dict(&sharded, &config).expect("state"),
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        let mut changed = 0;
        for (name, x) in &a {
            if let (HostTensor::F32 { values: x, .. }, HostTensor::F32 { values: y, .. }) =
                (x, &b[name])
            {
                let gap = max_relative_gap(x, y);
                assert!(gap <= 1e-5, "{name}: relative gap {gap:e}");
                changed += usize::from(initial[name] != b[name]);
            }
        }
        assert!(changed > 10);
        assert_eq!(initial[MASK_TOKEN], b[MASK_TOKEN], "no gradient, no update");

        // Each rank holds about a third of the moments; all-gathered they are the whole state.
        let total = whole.moment_floats();
        for shard in &shards {
            let share = shard.moment_floats();
            assert!(
                share.abs_diff(total / world) <= 2 * world * layouts[0].bucket_count(),
                "{share} of {total}"
            );
        }
        let mut file = shards[1]
            .gathered_file::<B, _>(&sharded, &config)
            .expect("file");
        for b in 0..layouts[0].bucket_count() {
            let both = {
                let parts: Vec<[Tensor<Flex, 1>; 2]> = shards
                    .iter()
                    .map(|s| {
                        s.moment_chunks::<B, _>(&sharded, b, &device)
                            .expect("chunks")
                    })
                    .collect();
                let first = Tensor::cat(parts.iter().map(|p| p[0].clone()).collect(), 0);
                let second = Tensor::cat(parts.iter().map(|p| p[1].clone()).collect(), 0);
                [first, second]
            };
            file.push_bucket(b, both).expect("bucket");
        }
        let got = state_dict_from_safetensors(&file.finish().expect("whole file")).expect("read");
        let expected = whole.state_dict::<B, _>(&unsharded).expect("state");
        assert_eq!(
            expected.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        assert!(!got.contains_key(&format!("{MASK_TOKEN}.exp_avg")));
        for (name, x) in &expected {
            match (x, &got[name]) {
                (HostTensor::F32 { values: x, .. }, HostTensor::F32 { values: y, .. }) => {
                    let gap = max_relative_gap(x, y);
                    assert!(gap <= 1e-4, "{name}: relative gap {gap:e}");
                }
                (x, y) => assert_eq!(x, y, "{name}"),
            }
        }
        assert!(
            shards[0].state_dict::<B, _>(&sharded).is_err(),
            "a shard is not the state"
        );

        // The gathered state loads into a sharded optimizer of another world size, each rank
        // keeping its own values.
        let two = ShardLayout::for_module::<B, _>(&sharded, limit, 2, 1);
        let mut reloaded = AdamW::<Flex>::new(adamw).with_shard(two.clone());
        reloaded
            .load_state_dict::<B, _>(&sharded, &expected, &device)
            .expect("load");
        let names = parameters::<B, _>(&sharded);
        let owned: usize = two
            .places()
            .iter()
            .zip(&names)
            .filter(|(_, info)| info.name != MASK_TOKEN)
            .map(|(p, _)| p.owned.len())
            .sum();
        assert_eq!(reloaded.moment_floats(), 2 * owned);
        let (i, info) = names
            .iter()
            .enumerate()
            .find(|(i, info)| {
                let owned = &two.places()[*i].owned;
                info.name != MASK_TOKEN && owned.len() > 1 && owned.start > 0
            })
            .expect("a parameter rank 1 owns the end of");
        let loaded = reloaded.moments.get(&info.id).expect("its moments");
        let whole_first = host(&whole.moments[&info.id].first);
        assert_eq!(
            host(&loaded.first),
            whole_first[two.places()[i].owned.clone()]
        );
    }
}
