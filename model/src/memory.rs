//! What a training step holds per rank, computed from the config alone (no model is built,
//! so SwinV2-G's three billion parameters are planned on any machine): `worker plan-memory`.
//!
//! Parameters are counted module by module as the encoders and heads build them (a test
//! checks the count against built models). Activations are the f32 tensors the autodiff graph
//! of this implementation keeps for the backward pass, per block: the inputs of both
//! LayerNorms and of every matmul, the fused qkv projection, the attention probabilities and
//! the MLP's hidden layer twice (GELU's input and output): `T (8C + 2M) + T h N` floats for `T`
//! tokens of width `C`, MLP width `M` and `h` heads over windows of `N` tokens (SwinV2's
//! normalised q and k and their scaled copy add about `7 T C`). With activation checkpointing
//! the graph keeps each block's input (`T C`) and, while a block is computed again, that one
//! block's graph. The stem, patch merging, final norm, head and loss are counted the same
//! way. Transient buffers (a matmul's output before the next op consumes it, the allocator's
//! slack) are not: measured peaks sit above the plan by those (see the README's table).

use simmim_proto::model_config::{EncoderConfig, HeadKind, SimMimConfig, SwinConfig, VitConfig};

/// Width of SwinV2's continuous-position-bias MLP.
const CPB_HIDDEN: u64 = 512;
const F32: u64 = 4;

/// Bytes one rank holds in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub parameters: u64,
    /// f32 weights.
    pub weights: u64,
    /// f32 gradients.
    pub gradients: u64,
    /// AdamW's two f32 moments (divided over the ranks with optimizer-state sharding).
    pub moments: u64,
    /// What the autodiff graph keeps at its peak for a batch of `batch` images.
    pub activations: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.moments + self.activations
    }
}

/// The plan for `batch` images per rank, with (`checkpointing`) or without activation
/// checkpointing, the moments shared over `ranks` ranks (1: every rank holds all).
pub fn plan(config: &SimMimConfig, batch: usize, checkpointing: bool, ranks: usize) -> MemoryPlan {
    let parameters = parameter_count(config);
    let floats = activation_floats(config, batch as u64, checkpointing);
    MemoryPlan {
        parameters,
        weights: parameters * F32,
        gradients: parameters * F32,
        moments: 2 * parameters * F32 / ranks.max(1) as u64,
        activations: floats * F32,
    }
}

/// Trainable parameters of the model `config` builds.
pub fn parameter_count(config: &SimMimConfig) -> u64 {
    let encoder = match &config.encoder {
        EncoderConfig::Swin(c) => swin_encoder_params(c, false),
        EncoderConfig::Swinv2(c) => swin_encoder_params(c, true),
        EncoderConfig::Vit(c) => vit_params(c),
    };
    encoder + head_params(config)
}

fn u(x: usize) -> u64 {
    x as u64
}

fn linear(d_in: u64, d_out: u64, bias: bool) -> u64 {
    d_in * d_out + if bias { d_out } else { 0 }
}

fn swin_block_params(c: &SwinConfig, stage: usize, v2: bool) -> u64 {
    let d = u(c.stage_dim(stage));
    let heads = u(c.num_heads[stage]);
    let (window, _) = c.stage_window(stage);
    let m = (c.stage_dim(stage) as f64 * c.mlp_ratio) as u64;
    let norms = 2 * 2 * d;
    let mlp = linear(d, m, true) + linear(m, d, true);
    let attention = if v2 {
        let qv_bias = if c.qkv_bias { 2 * d } else { 0 };
        linear(d, 3 * d, false)
            + qv_bias
            + linear(d, d, true)
            + linear(2, CPB_HIDDEN, true)
            + linear(CPB_HIDDEN, heads, false)
            + heads
    } else {
        let table = u((2 * window - 1) * (2 * window - 1)) * heads;
        linear(d, 3 * d, c.qkv_bias) + linear(d, d, true) + table
    };
    norms + attention + mlp
}

fn swin_encoder_params(c: &SwinConfig, v2: bool) -> u64 {
    let c0 = u(c.embed_dim);
    let p = u(c.patch_size);
    let tokens = u(c.patches_resolution() * c.patches_resolution());
    let mut total = linear(u(c.in_chans) * p * p, c0, true)
        + if c.patch_norm { 2 * c0 } else { 0 }
        + c0
        + if c.ape { tokens * c0 } else { 0 };
    let stages = c.depths.len();
    for (stage, &depth) in c.depths.iter().enumerate() {
        total += u(depth) * swin_block_params(c, stage, v2);
        if stage + 1 < stages {
            let d = u(c.stage_dim(stage));
            let norm = if v2 { 2 * 2 * d } else { 2 * 4 * d };
            total += norm + linear(4 * d, 2 * d, false);
        }
    }
    total + 2 * u(c.num_features())
}

fn vit_params(c: &VitConfig) -> u64 {
    let d = u(c.embed_dim);
    let p = u(c.patch_size);
    let grid = c.patches_resolution();
    let table = u((2 * grid - 1) * (2 * grid - 1) + 3) * u(c.num_heads);
    let m = (c.embed_dim as f64 * c.mlp_ratio) as u64;
    let layer_scale = c.init_values.is_some_and(|v| v > 0.0);
    let block = 2 * 2 * d
        + linear(d, 3 * d, false)
        + if c.qkv_bias { 2 * d } else { 0 }
        + linear(d, d, true)
        + if c.use_rpb { table } else { 0 }
        + linear(d, m, true)
        + linear(m, d, true)
        + if layer_scale { 2 * d } else { 0 };
    linear(u(c.in_chans) * p * p, d, true)
        + 2 * d
        + if c.use_ape { u(grid * grid + 1) * d } else { 0 }
        + if c.use_shared_rpb { table } else { 0 }
        + u(c.depth) * block
        + 2 * d
}

/// The prediction head's parameters (1x1 convs are linears over channels).
fn head_params(config: &SimMimConfig) -> u64 {
    let features = u(config.encoder.num_features());
    let in_chans = u(config.encoder.in_chans());
    let stride = u(config.target_geometry().map_or(1, |(_, s)| s));
    let out = stride * stride * in_chans;
    match config.head.kind {
        HeadKind::Linear => linear(features, out, true),
        HeadKind::Mlp => {
            let hidden = config.head.hidden.map_or(features, u);
            linear(features, hidden, true) + linear(hidden, out, true)
        }
        HeadKind::InverseSwin => {
            let Ok((c, depths)) = config.inverse_swin_decoder() else {
                return 0;
            };
            let stages = c.depths.len();
            let mut total = 0;
            for (stage, depth) in (0..stages.saturating_sub(1)).rev().zip(depths) {
                let wide = u(c.stage_dim(stage + 1));
                total += linear(wide, 2 * wide, false) + 2 * (wide / 2);
                total += u(depth) * swin_block_params(c, stage, false);
            }
            total + 2 * u(c.embed_dim) + linear(u(c.embed_dim), out, true)
        }
    }
}

/// f32 values the graph keeps at its peak (see the module comment).
fn activation_floats(config: &SimMimConfig, batch: u64, checkpointing: bool) -> u64 {
    let img = u(config.encoder.img_size());
    let pixels = batch * u(config.encoder.in_chans()) * img * img;
    // Head and loss: the head's input and output, and the loss's few image-sized tensors
    // (difference, its magnitude, the weighted sum's operands).
    let tail = |tokens: u64, width: u64| 2 * tokens * width + 4 * pixels;
    let (blocks, kept_inputs, stem, tail_floats) = match &config.encoder {
        EncoderConfig::Swin(c) | EncoderConfig::Swinv2(c) => {
            let v2 = matches!(config.encoder, EncoderConfig::Swinv2(_));
            let mut blocks = Vec::new();
            let mut inputs = 0;
            let stages = c.depths.len();
            for (stage, &depth) in c.depths.iter().enumerate() {
                let res = u(c.stage_resolution(stage));
                let tokens = batch * res * res;
                let d = u(c.stage_dim(stage));
                let m = (c.stage_dim(stage) as f64 * c.mlp_ratio) as u64;
                let heads = u(c.num_heads[stage]);
                let (window, _) = c.stage_window(stage);
                let n = u(window * window);
                let extra = if v2 { 7 * tokens * d } else { 0 };
                let block = tokens * (8 * d + 2 * m) + tokens * heads * n + extra;
                // Patch merging after the stage's last block: its gathered input twice
                // (the norm's and the reduction's), each `T/4 x 4C`.
                let merge = if stage + 1 < stages {
                    2 * tokens * d
                } else {
                    0
                };
                for index in 0..depth {
                    let last = index + 1 == depth;
                    blocks.push(block + if last { merge } else { 0 });
                    inputs += tokens * d;
                }
            }
            let res0 = u(c.patches_resolution());
            let last_res = u(c.stage_resolution(stages - 1));
            let last_tokens = batch * last_res * last_res;
            (
                blocks,
                inputs,
                3 * batch * res0 * res0 * u(c.embed_dim),
                tail(last_tokens, u(c.num_features())),
            )
        }
        EncoderConfig::Vit(c) => {
            let grid = u(c.patches_resolution());
            let tokens = batch * (grid * grid + 1);
            let d = u(c.embed_dim);
            let m = (c.embed_dim as f64 * c.mlp_ratio) as u64;
            let block =
                tokens * (8 * d + 2 * m) + batch * u(c.num_heads) * (grid * grid + 1).pow(2);
            (
                vec![block; c.depth],
                u(c.depth) * tokens * d,
                3 * tokens * d,
                tail(tokens, d),
            )
        }
    };
    if checkpointing {
        kept_inputs + blocks.iter().copied().max().unwrap_or(0) + stem.max(tail_floats)
    } else {
        blocks.iter().sum::<u64>() + stem + tail_floats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::naming::parameters;
    use crate::InitModel;
    use burn_flex::Flex;
    use simmim_proto::model_config::HeadKind;

    /// The count from the config equals the built model's, for every encoder and head.
    #[test]
    fn parameter_count_matches_the_built_model() {
        let mut configs: Vec<SimMimConfig> = ["swin_micro", "swinv2_micro"]
            .iter()
            .map(|p| SimMimConfig::preset(p).expect("preset"))
            .collect();
        let mut vit = SimMimConfig::preset("vit_base").expect("preset");
        if let EncoderConfig::Vit(c) = &mut vit.encoder {
            (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) = (32, 8, 32, 2, 2);
            c.use_rpb = true;
        }
        vit.mask_patch_size = 16;
        configs.push(vit);
        for kind in [HeadKind::Mlp, HeadKind::InverseSwin] {
            let mut c = SimMimConfig::preset("swin_micro").expect("preset");
            c.head.kind = kind;
            configs.push(c);
        }
        for config in configs {
            let model = config.init::<Flex>(0, &Default::default()).expect("init");
            let built: u64 = parameters::<Flex, _>(&model)
                .iter()
                .map(|p| p.shape.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(parameter_count(&config), built, "{config:?}");
        }
    }

    /// The SwinV2 sizes the paper reports: SwinV2-G about 3.0 billion parameters, -H about
    /// 658 million, and checkpointing cuts the planned activations by well over half.
    #[test]
    fn swinv2_sizes_and_checkpointing_savings() {
        let giant = SimMimConfig::preset("swinv2_giant").expect("preset");
        let huge = SimMimConfig::preset("swinv2_huge").expect("preset");
        let g = parameter_count(&giant) as f64 / 1e9;
        let h = parameter_count(&huge) as f64 / 1e6;
        assert!((2.8..3.1).contains(&g), "SwinV2-G: {g:.2} B");
        assert!((620.0..700.0).contains(&h), "SwinV2-H: {h:.0} M");
        let base = SimMimConfig::preset("swin_base").expect("preset");
        let all = plan(&base, 64, false, 1).activations as f64;
        let kept = plan(&base, 64, true, 1).activations as f64;
        assert!(kept < 0.5 * all, "{kept} of {all}");
        assert_eq!(
            plan(&base, 64, false, 4).moments * 4,
            plan(&base, 64, false, 1).moments
        );
    }
}
