//! Swin Transformer v1 encoder, as `SwinTransformerForSimMIM` in the official code: same
//! module tree (so parameter paths map one-to-one onto the official names), same math.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::backend::precision::matmul;
use crate::backend::SimMimBackend;
use crate::config::SwinConfig;
use crate::encoders::attention;
use crate::encoders::layers::{
    drop_path, drop_path_schedule, int_tensor, layer_norm, linear, linear_tokens, qkv_part,
    relative_bias, softmax_last, LayerNorm, Mlp, PatchEmbed,
};
use crate::encoders::rel_pos::{swin_relative_position_index, swin_shift_mask, swin_table_rows};
use crate::weights::init::WeightInit;

#[derive(Module, Debug)]
pub struct WindowAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub relative_position_bias_table: Param<Tensor<B, 2>>,
    relative_position_index: Tensor<B, 1, Int>,
    num_heads: usize,
    window: usize,
}

impl<B: SimMimBackend> WindowAttention<B> {
    fn new(
        init: &mut WeightInit,
        dim: usize,
        heads: usize,
        window: usize,
        qkv_bias: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            qkv: linear(init, dim, 3 * dim, qkv_bias, device),
            proj: linear(init, dim, dim, true, device),
            relative_position_bias_table: init.trunc_normal(
                [swin_table_rows(window), heads],
                0.02,
                device,
            ),
            relative_position_index: int_tensor(swin_relative_position_index(window), device),
            num_heads: heads,
            window,
        }
    }

    /// `windows`: `[B*nW, N, C]`; `mask`: `[nW, N, N]` for shifted windows.
    fn forward(&self, windows: Tensor<B, 3>, mask: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let [batch_windows, tokens, dim] = windows.dims();
        let heads = self.num_heads;
        let head_dim = dim / heads;
        let scale = (head_dim as f64).powf(-0.5);
        let bias = relative_bias(
            self.relative_position_bias_table.val(),
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
}

impl<B: SimMimBackend> SwinBlock<B> {
    pub(crate) fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let win = self.window;
        let windows = self.resolution / win;
        // Cyclic shift + window partition as one row gather (and its inverse after
        // attention): one copy each way instead of a roll, a permute and a reshape.
        let normed = self.norm1.forward(x.clone()).reshape([batch * tokens, dim]);
        let windowed = normed
            .select(0, batched_rows(&self.window_order, batch, tokens))
            .reshape([batch * windows * windows, win * win, dim]);
        let attended = self
            .attn
            .forward(windowed, self.attn_mask.as_ref())
            .reshape([batch * tokens, dim])
            .select(0, batched_rows(&self.token_order, batch, tokens))
            .reshape([batch, tokens, dim]);
        let x = x + drop_path(attended, self.drop_path);
        let branch = self.mlp.forward(self.norm2.forward(x.clone()));
        x + drop_path(branch, self.drop_path)
    }
}

/// The Swin blocks of stage `stage`'s geometry (width, grid, window, heads): every other block
/// shifted, as the official `BasicLayer`. The encoder builds its stages from it, and the
/// inverse Swin head its decoder stages, so both hold the same block.
pub(crate) fn stage_blocks<B: SimMimBackend>(
    init: &mut WeightInit,
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
                norm1: layer_norm(dim, 1e-5, device),
                attn: WindowAttention::new(
                    init,
                    dim,
                    c.num_heads[stage],
                    window,
                    c.qkv_bias,
                    device,
                ),
                norm2: layer_norm(dim, 1e-5, device),
                mlp: Mlp::new(init, dim, c.mlp_ratio, device),
                attn_mask,
                window_order: int_tensor(order, device),
                token_order: int_tensor(inverse, device),
                resolution: res,
                window,
                drop_path: rates.next().unwrap_or(0.0),
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

/// 2x2 neighbourhood concatenation then a linear reduction, halving the grid.
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub norm: LayerNorm<B>,
    pub reduction: Linear<B>,
    order: Tensor<B, 1, Int>,
}

impl<B: SimMimBackend> PatchMerging<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let merged = x
            .reshape([batch * tokens, dim])
            .select(0, batched_rows(&self.order, batch, tokens))
            .reshape([batch, tokens / 4, 4 * dim]);
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
    pub fn new(config: &SwinConfig, init: &mut WeightInit, device: &B::Device) -> Self {
        let c = config;
        let tokens = c.patches_resolution() * c.patches_resolution();
        let rates = drop_path_schedule(c.drop_path_rate, c.depths.iter().sum());
        let mut rates = rates.into_iter();
        let stages = c.depths.len();
        let layers = (0..stages)
            .map(|stage| {
                let dim = c.stage_dim(stage);
                let res = c.stage_resolution(stage);
                let blocks = stage_blocks(init, c, stage, c.depths[stage], &mut rates, device);
                let downsample = (stage + 1 < stages).then(|| PatchMerging {
                    norm: layer_norm(4 * dim, 1e-5, device),
                    reduction: linear(init, 4 * dim, 2 * dim, false, device),
                    order: int_tensor(merge_order(res), device),
                });
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
        let mut x = self.patch_embed.forward(images);
        if let Some(mask) = mask {
            let w = mask.unsqueeze_dim::<3>(2);
            x = x * (w.clone().neg().add_scalar(1.0)) + self.mask_token.val() * w;
        }
        if let Some(ape) = &self.absolute_pos_embed {
            x = x + ape.val();
        }
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
