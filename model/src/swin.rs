//! Swin Transformer v1 encoder, as `SwinTransformerForSimMIM` in the official code: same
//! module tree (so parameter paths map one-to-one onto the official names), same math.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::config::SwinConfig;
use crate::init::WeightInit;
use crate::layers::{
    drop_path, drop_path_schedule, int_tensor, layer_norm, linear, relative_bias, Mlp,
    PatchEmbed,
};
use crate::rel_pos::{swin_relative_position_index, swin_shift_mask, swin_table_rows};

#[derive(Module, Debug)]
pub struct WindowAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub relative_position_bias_table: Param<Tensor<B, 2>>,
    relative_position_index: Tensor<B, 1, Int>,
    num_heads: usize,
    window: usize,
}

impl<B: Backend> WindowAttention<B> {
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
        let qkv = self
            .qkv
            .forward(windows)
            .reshape([batch_windows, tokens, 3, heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let k = qkv.clone().narrow(0, 1, 1).squeeze_dim::<4>(0);
        let v = qkv.narrow(0, 2, 1).squeeze_dim::<4>(0);

        let scale = (head_dim as f64).powf(-0.5);
        let mut attn = q.mul_scalar(scale).matmul(k.swap_dims(2, 3));
        let bias = relative_bias(
            self.relative_position_bias_table.val(),
            self.relative_position_index.clone(),
            self.window * self.window,
        );
        attn = attn + bias.unsqueeze_dim(0);
        if let Some(mask) = mask {
            let windows_per_image = mask.dims()[0];
            attn = (attn.reshape([
                batch_windows / windows_per_image,
                windows_per_image,
                heads,
                tokens,
                tokens,
            ]) + mask.clone().unsqueeze_dim::<4>(1).unsqueeze_dim(0))
            .reshape([batch_windows, heads, tokens, tokens]);
        }
        let out = softmax(attn, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch_windows, tokens, dim]);
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct SwinBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: WindowAttention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    attn_mask: Option<Tensor<B, 3>>,
    resolution: usize,
    window: usize,
    shift: usize,
    drop_path: f64,
}

impl<B: Backend> SwinBlock<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let (res, win) = (self.resolution, self.window);
        let mut grid = self.norm1.forward(x.clone()).reshape([batch, res, res, dim]);
        let shift = self.shift;
        if shift > 0 {
            grid = cyclic_shift(cyclic_shift(grid, res - shift, 1), res - shift, 2);
        }
        let per_side = res / win;
        let windows = grid
            .reshape([batch, per_side, win, per_side, win, dim])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([batch * per_side * per_side, win * win, dim]);
        let attended = self.attn.forward(windows, self.attn_mask.as_ref());
        let mut grid = attended
            .reshape([batch, per_side, per_side, win, win, dim])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([batch, res, res, dim]);
        if shift > 0 {
            grid = cyclic_shift(cyclic_shift(grid, shift, 1), shift, 2);
        }
        let x = x + drop_path(grid.reshape([batch, tokens, dim]), self.drop_path);
        let branch = self.mlp.forward(self.norm2.forward(x.clone()));
        x + drop_path(branch, self.drop_path)
    }
}

/// `torch.roll(x, shift, dim)` for `0 <= shift < size`: element `i` moves to `i + shift`.
/// Written out with narrow + cat because Burn 0.21's `roll` uses the opposite sign
/// convention to PyTorch's (measured), and the shifted-window mask depends on the direction.
fn cyclic_shift<B: Backend>(x: Tensor<B, 4>, shift: usize, dim: usize) -> Tensor<B, 4> {
    let size = x.dims()[dim];
    let shift = shift % size;
    if shift == 0 {
        return x;
    }
    let tail = x.clone().narrow(dim, size - shift, shift);
    let head = x.narrow(dim, 0, size - shift);
    Tensor::cat(vec![tail, head], dim)
}

/// 2x2 neighbourhood concatenation then a linear reduction, halving the grid.
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub norm: LayerNorm<B>,
    pub reduction: Linear<B>,
    resolution: usize,
}

impl<B: Backend> PatchMerging<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, _, dim] = x.dims();
        let half = self.resolution / 2;
        // The official order is x0=(even row, even col), x1=(odd, even), x2=(even, odd),
        // x3=(odd, odd): column parity is the slower index, so it comes first here.
        let merged = x
            .reshape([batch, half, 2, half, 2, dim])
            .permute([0, 1, 3, 4, 2, 5])
            .reshape([batch, half * half, 4 * dim]);
        self.reduction.forward(self.norm.forward(merged))
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

impl<B: Backend> Swin<B> {
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
                let (window, shift_size) = c.stage_window(stage);
                let blocks = (0..c.depths[stage])
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
                            resolution: res,
                            window,
                            shift,
                            drop_path: rates.next().unwrap_or(0.0),
                        }
                    })
                    .collect();
                let downsample = (stage + 1 < stages).then(|| PatchMerging {
                    norm: layer_norm(4 * dim, 1e-5, device),
                    reduction: linear(init, 4 * dim, 2 * dim, false, device),
                    resolution: res,
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
}
