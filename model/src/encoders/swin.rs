//! Swin Transformer encoders, v1 (`SwinTransformerForSimMIM` in the official code) and v2
//! (`SwinTransformerV2ForSimMIM`): same module trees (so parameter paths map one-to-one onto
//! the official names), same math. The versions share the window machinery (cyclic shift,
//! partition, masks, merging order) and differ inside three modules, which carry the v2
//! parts as optional fields: the attention (scaled cosine attention, a continuous position
//! bias, q/v biases), the block (norms after the branches, inside the residual) and the patch
//! merging (the norm after the reduction).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::backend::precision::matmul;
use crate::backend::SimMimBackend;
use crate::config::SwinConfig;
use crate::encoders::attention;
use crate::encoders::layers::{
    draw_keep, drop_path_schedule, int_tensor, kept, layer_norm, linear, linear_rows,
    linear_tokens, qkv_part, relative_bias, softmax_last, training_keep, DropKeep, LayerNorm, Mlp,
    PatchEmbed,
};
use crate::encoders::rel_pos::{
    swin_relative_position_index, swin_shift_mask, swin_table_rows, swinv2_coords_table,
};
use crate::weights::init::{constant, WeightInit};

/// Which Swin: v1's learned bias table and pre-norm blocks, or v2's cosine attention,
/// continuous position bias and res-post-norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinVersion {
    V1,
    V2,
}

/// SwinV2's `cpb_mlp`: `Linear(2, 512) -> ReLU -> Linear(512, heads, bias=False)` over the
/// log-spaced relative coordinates. The two linears are `hidden` and `output` here and
/// `cpb_mlp.0` / `cpb_mlp.2` officially (an `nn.Sequential` with the ReLU at index 1).
#[derive(Module, Debug)]
pub struct ContinuousPositionBias<B: Backend> {
    pub hidden: Linear<B>,
    pub output: Linear<B>,
}

/// Width of SwinV2's position-bias MLP.
const CPB_HIDDEN: usize = 512;

impl<B: SimMimBackend> ContinuousPositionBias<B> {
    /// The bias table `[rows, heads]` for coordinates `[rows, 2]`, as `16 * sigmoid(mlp)`.
    fn table(&self, coords: Tensor<B, 2>) -> Tensor<B, 2> {
        let hidden = burn::tensor::activation::relu(linear_rows(&self.hidden, coords));
        burn::tensor::activation::sigmoid(linear_rows(&self.output, hidden)).mul_scalar(16.0)
    }
}

#[derive(Module, Debug)]
pub struct WindowAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    /// v1's learned table `[(2W-1)^2, heads]`.
    pub relative_position_bias_table: Option<Param<Tensor<B, 2>>>,
    /// v2: the MLP that computes the table from coordinates.
    pub cpb_mlp: Option<ContinuousPositionBias<B>>,
    /// v2: per-head log of the cosine-similarity scale, `[heads, 1, 1]`.
    pub logit_scale: Option<Param<Tensor<B, 3>>>,
    /// v2: q and v biases (k has none); v1's qkv linear carries its own bias.
    pub q_bias: Option<Param<Tensor<B, 1>>>,
    pub v_bias: Option<Param<Tensor<B, 1>>>,
    /// v2: the log-spaced relative coordinates `[(2W-1)^2, 2]` the MLP reads.
    relative_coords_table: Option<Tensor<B, 2>>,
    relative_position_index: Tensor<B, 1, Int>,
    num_heads: usize,
    window: usize,
}

/// `log(1 / 0.01)`: the official clamp on SwinV2's logit scale before `exp`.
const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

impl<B: SimMimBackend> WindowAttention<B> {
    /// `pretrained_window`: v2's coordinate normaliser (0: this window).
    #[allow(clippy::too_many_arguments)]
    fn new(
        init: &mut WeightInit,
        version: SwinVersion,
        dim: usize,
        heads: usize,
        window: usize,
        pretrained_window: usize,
        qkv_bias: bool,
        device: &B::Device,
    ) -> Self {
        let index = int_tensor(swin_relative_position_index(window), device);
        match version {
            SwinVersion::V1 => Self {
                qkv: linear(init, dim, 3 * dim, qkv_bias, device),
                proj: linear(init, dim, dim, true, device),
                relative_position_bias_table: Some(init.trunc_normal(
                    [swin_table_rows(window), heads],
                    0.02,
                    device,
                )),
                cpb_mlp: None,
                logit_scale: None,
                q_bias: None,
                v_bias: None,
                relative_coords_table: None,
                relative_position_index: index,
                num_heads: heads,
                window,
            },
            SwinVersion::V2 => {
                let rows = swin_table_rows(window);
                Self {
                    cpb_mlp: Some(ContinuousPositionBias {
                        hidden: linear(init, 2, CPB_HIDDEN, true, device),
                        output: linear(init, CPB_HIDDEN, heads, false, device),
                    }),
                    qkv: linear(init, dim, 3 * dim, false, device),
                    proj: linear(init, dim, dim, true, device),
                    relative_position_bias_table: None,
                    logit_scale: Some(constant([heads, 1, 1], 10f32.ln(), device)),
                    q_bias: qkv_bias.then(|| constant([dim], 0.0, device)),
                    v_bias: qkv_bias.then(|| constant([dim], 0.0, device)),
                    relative_coords_table: Some(Tensor::from_data(
                        TensorData::new(swinv2_coords_table(window, pretrained_window), [rows, 2]),
                        device,
                    )),
                    relative_position_index: index,
                    num_heads: heads,
                    window,
                }
            }
        }
    }

    /// `windows`: `[B*nW, N, C]`; `mask`: `[nW, N, N]` for shifted windows.
    fn forward(&self, windows: Tensor<B, 3>, mask: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        if let (Some(cpb), Some(logit_scale), Some(coords)) = (
            &self.cpb_mlp,
            &self.logit_scale,
            &self.relative_coords_table,
        ) {
            return self.forward_cosine(cpb, logit_scale, coords, windows, mask);
        }
        let [batch_windows, tokens, dim] = windows.dims();
        let heads = self.num_heads;
        let head_dim = dim / heads;
        let scale = (head_dim as f64).powf(-0.5);
        let Some(table) = &self.relative_position_bias_table else {
            unreachable!("a v1 window attention holds its bias table")
        };
        let bias = relative_bias(
            table.val(),
            self.relative_position_index.clone(),
            self.window * self.window,
        );
        if attention::use_fused::<B>() {
            // One projection, read in place by the backend's attention kernel.
            let bias = match mask {
                Some(mask) => bias.unsqueeze_dim::<4>(0) + mask.clone().unsqueeze_dim(1),
                None => bias.unsqueeze_dim(0),
            };
            let qkv = linear_tokens(&self.qkv, windows);
            return linear_tokens(&self.proj, attention::attention(qkv, bias, heads, scale));
        }
        let rows = windows.reshape([batch_windows * tokens, dim]);
        let weight = self.qkv.weight.val();
        let shape = [batch_windows, tokens, heads];
        let part = |i: usize, scale: f64| {
            let bias = self
                .qkv
                .bias
                .as_ref()
                .map(|b| b.val().narrow(0, i * dim, dim));
            qkv_part(&weight, bias, &rows, i, scale, shape)
        };
        let (q, k, v) = (part(0, scale), part(1, 1.0), part(2, 1.0));

        let attn = matmul(q, k.swap_dims(2, 3));
        // Position bias and shift mask are summed while small ([nW, heads, N, N]) so the
        // large logits tensor takes a single broadcast add.
        let attn = match mask {
            Some(mask) => {
                let windows_per_image = mask.dims()[0];
                let bias_and_mask = bias.unsqueeze_dim::<4>(0) + mask.clone().unsqueeze_dim(1);
                (attn.reshape([
                    batch_windows / windows_per_image,
                    windows_per_image,
                    heads,
                    tokens,
                    tokens,
                ]) + bias_and_mask.unsqueeze_dim(0))
                .reshape([batch_windows, heads, tokens, tokens])
            }
            None => attn + bias.unsqueeze_dim(0),
        };
        let out =
            matmul(softmax_last(attn), v)
                .swap_dims(1, 2)
                .reshape([batch_windows, tokens, dim]);
        linear_tokens(&self.proj, out)
    }

    /// SwinV2's scaled cosine attention: `cos(q, k) * exp(min(logit_scale, log 100))` plus
    /// `16 * sigmoid(cpb_mlp(coords))`. The per-head scale is folded into the normalised q,
    /// so the logits are `q' k^T` with a scale of 1 and the backend's attention kernel (or
    /// its decomposition) serves both versions.
    fn forward_cosine(
        &self,
        cpb: &ContinuousPositionBias<B>,
        logit_scale: &Param<Tensor<B, 3>>,
        coords: &Tensor<B, 2>,
        windows: Tensor<B, 3>,
        mask: Option<&Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let [batch_windows, tokens, dim] = windows.dims();
        let heads = self.num_heads;
        let head_dim = dim / heads;
        let mut qkv = matmul(
            windows.reshape([batch_windows * tokens, dim]),
            self.qkv.weight.val(),
        );
        if let (Some(q_bias), Some(v_bias)) = (&self.q_bias, &self.v_bias) {
            let zeros = Tensor::zeros([dim], &qkv.device());
            qkv = qkv + Tensor::cat(vec![q_bias.val(), zeros, v_bias.val()], 0).unsqueeze_dim(0);
        }
        let qkv = qkv.reshape([batch_windows, tokens, 3, heads, head_dim]);
        let scale = logit_scale
            .val()
            .clamp_max(MAX_LOGIT_SCALE)
            .exp()
            .reshape([1, 1, 1, heads, 1]);
        let q = l2_normalize(qkv.clone().narrow(2, 0, 1)) * scale;
        let k = l2_normalize(qkv.clone().narrow(2, 1, 1));
        let v = qkv.narrow(2, 2, 1);
        let qkv = Tensor::cat(vec![q, k, v], 2).reshape([batch_windows, tokens, 3 * dim]);
        let bias = relative_bias(
            cpb.table(coords.clone()),
            self.relative_position_index.clone(),
            tokens,
        );
        let bias = match mask {
            Some(mask) => bias.unsqueeze_dim::<4>(0) + mask.clone().unsqueeze_dim(1),
            None => bias.unsqueeze_dim(0),
        };
        linear_tokens(&self.proj, attention::attention(qkv, bias, heads, 1.0))
    }
}

/// `F.normalize(x, dim=-1)`: `x / max(||x||, 1e-12)` over the last dimension.
fn l2_normalize<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let norm = x
        .clone()
        .powi_scalar(2)
        .sum_dim(D - 1)
        .sqrt()
        .clamp_min(1e-12);
    x / norm
}

#[derive(Module, Debug)]
pub struct SwinBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: WindowAttention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    attn_mask: Option<Tensor<B, 3>>,
    /// Gathers the (shifted) grid into window-major order.
    window_order: Tensor<B, 1, Int>,
    /// Inverse of `window_order`.
    token_order: Tensor<B, 1, Int>,
    resolution: usize,
    window: usize,
    drop_path: f64,
    /// v2's res-post-norm: `x + norm(branch(x))` instead of v1's `x + branch(norm(x))`.
    post_norm: bool,
}

impl<B: SimMimBackend> SwinBlock<B> {
    pub(crate) fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let keep = training_keep(self.drop_path, x.dims()[0], &x.device());
        self.forward_with(x, keep.as_ref())
    }

    /// The block with the drop-path draws given (see [`DropKeep`]).
    pub(crate) fn forward_with(&self, x: Tensor<B, 3>, keep: Option<&DropKeep<B>>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let [keep_attn, keep_mlp] = match keep {
            Some([a, m]) => [Some(a), Some(m)],
            None => [None, None],
        };
        let win = self.window;
        let windows = self.resolution / win;
        let attn_input = if self.post_norm {
            x.clone()
        } else {
            self.norm1.forward(x.clone())
        };
        // Cyclic shift + window partition as one row gather (and its inverse after
        // attention): one copy each way instead of a roll, a permute and a reshape.
        let windowed = attn_input
            .reshape([batch * tokens, dim])
            .select(0, batched_rows(&self.window_order, batch, tokens))
            .reshape([batch * windows * windows, win * win, dim]);
        let attended = self
            .attn
            .forward(windowed, self.attn_mask.as_ref())
            .reshape([batch * tokens, dim])
            .select(0, batched_rows(&self.token_order, batch, tokens))
            .reshape([batch, tokens, dim]);
        if self.post_norm {
            let x = x + kept(self.norm1.forward(attended), keep_attn);
            let branch = self.norm2.forward(self.mlp.forward(x.clone()));
            return x + kept(branch, keep_mlp);
        }
        let x = x + kept(attended, keep_attn);
        let branch = self.mlp.forward(self.norm2.forward(x.clone()));
        x + kept(branch, keep_mlp)
    }
}

/// A LayerNorm for a block's branch: v1's `(1, 0)` init before the branch, v2's res-post-norm
/// starting at zero (`_init_respostnorm`), so every v2 block starts as the identity.
fn branch_norm<B: Backend>(version: SwinVersion, dim: usize, device: &B::Device) -> LayerNorm<B> {
    let mut norm = layer_norm(dim, 1e-5, device);
    if version == SwinVersion::V2 {
        norm.gamma = constant([dim], 0.0, device);
    }
    norm
}

/// The Swin blocks of stage `stage`'s geometry (width, grid, window, heads): every other block
/// shifted, as the official `BasicLayer`. The encoder builds its stages from it, and the
/// inverse Swin head its decoder stages, so both hold the same block.
pub(crate) fn stage_blocks<B: SimMimBackend>(
    init: &mut WeightInit,
    version: SwinVersion,
    c: &SwinConfig,
    stage: usize,
    depth: usize,
    rates: &mut impl Iterator<Item = f64>,
    device: &B::Device,
) -> Vec<SwinBlock<B>> {
    let dim = c.stage_dim(stage);
    let res = c.stage_resolution(stage);
    let (window, shift_size) = c.stage_window(stage);
    (0..depth)
        .map(|index| {
            let shift = if index % 2 == 1 { shift_size } else { 0 };
            let attn_mask = (shift > 0).then(|| {
                let n = window * window;
                let per_side = res / window;
                Tensor::from_data(
                    TensorData::new(
                        swin_shift_mask(res, window, shift),
                        [per_side * per_side, n, n],
                    ),
                    device,
                )
            });
            let order = window_order(res, window, shift);
            let inverse = inverse_permutation(&order);
            SwinBlock {
                norm1: branch_norm(version, dim, device),
                attn: WindowAttention::new(
                    init,
                    version,
                    dim,
                    c.num_heads[stage],
                    window,
                    c.pretrained_window(stage),
                    c.qkv_bias,
                    device,
                ),
                norm2: branch_norm(version, dim, device),
                mlp: Mlp::new(init, dim, c.mlp_ratio, device),
                attn_mask,
                window_order: int_tensor(order, device),
                token_order: int_tensor(inverse, device),
                resolution: res,
                window,
                drop_path: rates.next().unwrap_or(0.0),
                post_norm: version == SwinVersion::V2,
            }
        })
        .collect()
}

/// Row indices of a `[batch * tokens, C]` matrix that apply the per-image permutation
/// `order` to every image of the batch.
fn batched_rows<B: Backend>(
    order: &Tensor<B, 1, Int>,
    batch: usize,
    tokens: usize,
) -> Tensor<B, 1, Int> {
    if batch == 1 {
        return order.clone();
    }
    let device = order.device();
    let offsets = Tensor::<B, 1, Int>::arange(0..batch as i64, &device)
        .mul_scalar(tokens as i64)
        .unsqueeze_dim::<2>(1);
    (order.clone().unsqueeze_dim::<2>(0) + offsets).reshape([batch * tokens])
}

/// For each position of the window-major sequence, the token it takes from the
/// `res x res` grid after `torch.roll(x, (-shift, -shift))`.
fn window_order(res: usize, window: usize, shift: usize) -> Vec<i64> {
    let per_side = res / window;
    let mut order = Vec::with_capacity(res * res);
    for wh in 0..per_side {
        for ww in 0..per_side {
            for t in 0..window * window {
                let h = (wh * window + t / window + shift) % res;
                let w = (ww * window + t % window + shift) % res;
                order.push((h * res + w) as i64);
            }
        }
    }
    order
}

fn inverse_permutation(order: &[i64]) -> Vec<i64> {
    let mut inverse = vec![0i64; order.len()];
    for (position, &source) in order.iter().enumerate() {
        inverse[source as usize] = position as i64;
    }
    inverse
}

/// Token order that groups each 2x2 neighbourhood as the official `PatchMerging` concatenates
/// it: x0 = (even row, even col), x1 = (odd, even), x2 = (even, odd), x3 = (odd, odd).
fn merge_order(res: usize) -> Vec<i64> {
    let half = res / 2;
    let mut order = Vec::with_capacity(res * res);
    for h2 in 0..half {
        for w2 in 0..half {
            for (dh, dw) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                order.push(((2 * h2 + dh) * res + 2 * w2 + dw) as i64);
            }
        }
    }
    order
}

/// 2x2 neighbourhood concatenation then a linear reduction, halving the grid; v1 norms the
/// 4C concatenation before the reduction, v2 the 2C result after it.
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub norm: LayerNorm<B>,
    pub reduction: Linear<B>,
    order: Tensor<B, 1, Int>,
    norm_after: bool,
}

impl<B: SimMimBackend> PatchMerging<B> {
    fn new(
        init: &mut WeightInit,
        version: SwinVersion,
        dim: usize,
        res: usize,
        device: &B::Device,
    ) -> Self {
        let norm_after = version == SwinVersion::V2;
        Self {
            norm: layer_norm(if norm_after { 2 * dim } else { 4 * dim }, 1e-5, device),
            reduction: linear(init, 4 * dim, 2 * dim, false, device),
            order: int_tensor(merge_order(res), device),
            norm_after,
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let merged = x
            .reshape([batch * tokens, dim])
            .select(0, batched_rows(&self.order, batch, tokens))
            .reshape([batch, tokens / 4, 4 * dim]);
        if self.norm_after {
            return self.norm.forward(linear_tokens(&self.reduction, merged));
        }
        linear_tokens(&self.reduction, self.norm.forward(merged))
    }
}

#[derive(Module, Debug)]
pub struct BasicLayer<B: Backend> {
    pub blocks: Vec<SwinBlock<B>>,
    pub downsample: Option<PatchMerging<B>>,
}

#[derive(Module, Debug)]
pub struct Swin<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub mask_token: Param<Tensor<B, 3>>,
    pub absolute_pos_embed: Option<Param<Tensor<B, 3>>>,
    pub layers: Vec<BasicLayer<B>>,
    pub norm: LayerNorm<B>,
}

impl<B: SimMimBackend> Swin<B> {
    pub fn new(
        config: &SwinConfig,
        version: SwinVersion,
        init: &mut WeightInit,
        device: &B::Device,
    ) -> Self {
        let c = config;
        let tokens = c.patches_resolution() * c.patches_resolution();
        let rates = drop_path_schedule(c.drop_path_rate, c.depths.iter().sum());
        let mut rates = rates.into_iter();
        let stages = c.depths.len();
        let layers = (0..stages)
            .map(|stage| {
                let dim = c.stage_dim(stage);
                let res = c.stage_resolution(stage);
                let blocks =
                    stage_blocks(init, version, c, stage, c.depths[stage], &mut rates, device);
                let downsample = (stage + 1 < stages)
                    .then(|| PatchMerging::new(init, version, dim, res, device));
                BasicLayer { blocks, downsample }
            })
            .collect();
        Self {
            patch_embed: PatchEmbed::new(
                init,
                c.in_chans,
                c.patch_size,
                c.embed_dim,
                c.patch_norm,
                device,
            ),
            mask_token: init.trunc_normal([1, 1, c.embed_dim], 0.02, device),
            absolute_pos_embed: c
                .ape
                .then(|| init.trunc_normal([1, tokens, c.embed_dim], 0.02, device)),
            layers,
            norm: layer_norm(c.num_features(), 1e-5, device),
        }
    }

    /// `images` `[B, C, H, W]`, `mask` `[B, L]` (1 = masked, or `None` for no masking) to the
    /// final-stage tokens `[B, L_out, C_out]`.
    pub fn forward(&self, images: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let mut x = self.stem(images, mask);
        for layer in &self.layers {
            for block in &layer.blocks {
                x = block.forward(x);
            }
            if let Some(merge) = &layer.downsample {
                x = merge.forward(x);
            }
        }
        self.norm.forward(x)
    }

    /// Patch embedding, mask token and absolute position embedding.
    pub(crate) fn stem(&self, images: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let mut x = self.patch_embed.forward(images);
        if let Some(mask) = mask {
            let w = mask.unsqueeze_dim::<3>(2);
            x = x * (w.clone().neg().add_scalar(1.0)) + self.mask_token.val() * w;
        }
        if let Some(ape) = &self.absolute_pos_embed {
            x = x + ape.val();
        }
        x
    }

    /// Blocks over all stages, in order.
    pub(crate) fn block_count(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len()).sum()
    }

    /// The stage of block `index` (counted over all stages) and its place in the stage.
    fn locate(&self, index: usize) -> (usize, usize) {
        let mut rest = index;
        for (stage, layer) in self.layers.iter().enumerate() {
            if rest < layer.blocks.len() {
                return (stage, rest);
            }
            rest -= layer.blocks.len();
        }
        panic!("block {index} of {}", self.block_count())
    }

    /// Block `index` (counted over all stages); a stage's last block also merges patches.
    pub(crate) fn block(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        keep: Option<&DropKeep<B>>,
    ) -> Tensor<B, 3> {
        let (stage, at) = self.locate(index);
        let layer = &self.layers[stage];
        let x = layer.blocks[at].forward_with(x, keep);
        match &layer.downsample {
            Some(merge) if at + 1 == layer.blocks.len() => merge.forward(x),
            _ => x,
        }
    }

    pub(crate) fn draw_keep(
        &self,
        index: usize,
        batch: usize,
        device: &B::Device,
    ) -> Option<DropKeep<B>> {
        let (stage, at) = self.locate(index);
        draw_keep(self.layers[stage].blocks[at].drop_path, batch, device)
    }

    /// The final norm.
    pub(crate) fn finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm.forward(x)
    }

    /// Unmasked tokens leaving stage `stage` (before its patch merging), `[B, L_s, C_s]`;
    /// the last stage's are normed as in [`Self::forward`]. For probing intermediate stages.
    pub fn stage_tokens(&self, images: Tensor<B, 4>, stage: usize) -> Tensor<B, 3> {
        let last = self.layers.len() - 1;
        if stage >= last {
            return self.forward(images, None);
        }
        let mut x = self.patch_embed.forward(images);
        if let Some(ape) = &self.absolute_pos_embed {
            x = x + ape.val();
        }
        for (index, layer) in self.layers.iter().enumerate().take(stage + 1) {
            for block in &layer.blocks {
                x = block.forward(x);
            }
            if index < stage {
                if let Some(merge) = &layer.downsample {
                    x = merge.forward(x);
                }
            }
        }
        x
    }
}
