//! BEiT-style ViT encoder as SimMIM's `VisionTransformerForSimMIM`: cls token, optional
//! absolute position embedding, relative position bias per block or shared, layer scale,
//! q and v biases only, LayerNorm eps 1e-6.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::backend::precision::matmul;
use crate::backend::SimMimBackend;
use crate::config::VitConfig;
use crate::encoders::attention;
use crate::encoders::layers::{
    draw_keep, drop_path_schedule, int_tensor, kept, layer_norm, linear, linear_tokens, qkv_part,
    relative_bias, softmax_last, training_keep, DropKeep, LayerNorm, Mlp, PatchEmbed,
};
use crate::encoders::rel_pos::{vit_relative_position_index, vit_table_rows};
use crate::weights::init::{constant, WeightInit};

const VIT_LN_EPS: f64 = 1e-6;

/// A relative position bias table with its index, for one block or shared by all.
#[derive(Module, Debug)]
pub struct RelativePositionBias<B: Backend> {
    pub relative_position_bias_table: Param<Tensor<B, 2>>,
    relative_position_index: Tensor<B, 1, Int>,
    tokens: usize,
}

impl<B: SimMimBackend> RelativePositionBias<B> {
    fn new(grid: usize, heads: usize, device: &B::Device) -> Self {
        Self {
            // BEiT initialises these tables to zero.
            relative_position_bias_table: constant([vit_table_rows(grid), heads], 0.0, device),
            relative_position_index: int_tensor(vit_relative_position_index(grid), device),
            tokens: grid * grid + 1,
        }
    }

    /// `[heads, N+1, N+1]`.
    fn forward(&self) -> Tensor<B, 3> {
        relative_bias(
            self.relative_position_bias_table.val(),
            self.relative_position_index.clone(),
            self.tokens,
        )
    }
}

#[derive(Module, Debug)]
pub struct VitAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub q_bias: Option<Param<Tensor<B, 1>>>,
    pub v_bias: Option<Param<Tensor<B, 1>>>,
    /// Per-block table (`use_rpb`); its parameters keep the official flat names
    /// `attn.relative_position_bias_table` through the naming layer.
    pub relative_position_bias_table: Option<Param<Tensor<B, 2>>>,
    relative_position_index: Option<Tensor<B, 1, Int>>,
    pub proj: Linear<B>,
    num_heads: usize,
}

impl<B: SimMimBackend> VitAttention<B> {
    fn forward(&self, x: Tensor<B, 3>, shared_bias: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let heads = self.num_heads;
        let head_dim = dim / heads;
        let rows = x.reshape([batch * tokens, dim]);
        let weight = self.qkv.weight.val();
        let shape = [batch, tokens, heads];
        // k has no bias in BEiT's attention: `cat(q_bias, zeros, v_bias)`.
        let scale = (head_dim as f64).powf(-0.5);
        let q_bias = self.q_bias.as_ref().map(|b| b.val());
        let v_bias = self.v_bias.as_ref().map(|b| b.val());
        if attention::use_fused::<B>() {
            return self.forward_fused(rows, [batch, tokens], q_bias, v_bias, shared_bias);
        }
        let q = qkv_part(&weight, q_bias, &rows, 0, scale, shape);
        let k = qkv_part(&weight, None, &rows, 1, 1.0, shape);
        let v = qkv_part(&weight, v_bias, &rows, 2, 1.0, shape);

        let mut attn = matmul(q, k.swap_dims(2, 3));
        if let (Some(table), Some(index)) = (
            &self.relative_position_bias_table,
            &self.relative_position_index,
        ) {
            attn = attn + relative_bias(table.val(), index.clone(), tokens).unsqueeze_dim(0);
        }
        if let Some(bias) = shared_bias {
            attn = attn + bias.clone().unsqueeze_dim(0);
        }
        let out = matmul(softmax_last(attn), v)
            .swap_dims(1, 2)
            .reshape([batch, tokens, dim]);
        linear_tokens(&self.proj, out)
    }

    /// The forward through the backend's attention kernel: one qkv projection, and the
    /// block's and the shared relative position biases summed while small.
    fn forward_fused(
        &self,
        rows: Tensor<B, 2>,
        [batch, tokens]: [usize; 2],
        q_bias: Option<Tensor<B, 1>>,
        v_bias: Option<Tensor<B, 1>>,
        shared_bias: Option<&Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let dim = rows.dims()[1];
        let heads = self.num_heads;
        let scale = ((dim / heads) as f64).powf(-0.5);
        let mut qkv = matmul(rows, self.qkv.weight.val());
        if q_bias.is_some() || v_bias.is_some() {
            let device = qkv.device();
            let zeros = || Tensor::zeros([dim], &device);
            let (q_bias, v_bias) = (q_bias.unwrap_or_else(zeros), v_bias.unwrap_or_else(zeros));
            qkv = qkv + Tensor::cat(vec![q_bias, zeros(), v_bias], 0).unsqueeze_dim(0);
        }
        let own_bias = match (
            &self.relative_position_bias_table,
            &self.relative_position_index,
        ) {
            (Some(table), Some(index)) => Some(relative_bias(table.val(), index.clone(), tokens)),
            _ => None,
        };
        let bias = match (own_bias, shared_bias) {
            (Some(own), Some(shared)) => own + shared.clone(),
            (Some(own), None) => own,
            (None, Some(shared)) => shared.clone(),
            (None, None) => Tensor::zeros([heads, tokens, tokens], &qkv.device()),
        };
        let qkv = qkv.reshape([batch, tokens, 3 * dim]);
        let out = attention::attention(qkv, bias.unsqueeze_dim(0), heads, scale);
        linear_tokens(&self.proj, out)
    }
}

#[derive(Module, Debug)]
pub struct VitBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: VitAttention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub gamma_1: Option<Param<Tensor<B, 1>>>,
    pub gamma_2: Option<Param<Tensor<B, 1>>>,
    drop_path: f64,
}

impl<B: SimMimBackend> VitBlock<B> {
    /// The block with the drop-path draws given (see [`DropKeep`]).
    fn forward_with(
        &self,
        x: Tensor<B, 3>,
        shared_bias: Option<&Tensor<B, 3>>,
        keep: Option<&DropKeep<B>>,
    ) -> Tensor<B, 3> {
        let [keep_attn, keep_mlp] = match keep {
            Some([a, m]) => [Some(a), Some(m)],
            None => [None, None],
        };
        let scale = |branch: Tensor<B, 3>, gamma: &Option<Param<Tensor<B, 1>>>| match gamma {
            Some(g) => branch * g.val().unsqueeze_dim::<2>(0).unsqueeze_dim(0),
            None => branch,
        };
        let branch = self
            .attn
            .forward(self.norm1.forward(x.clone()), shared_bias);
        let x = x + kept(scale(branch, &self.gamma_1), keep_attn);
        let branch = self.mlp.forward(self.norm2.forward(x.clone()));
        x + kept(scale(branch, &self.gamma_2), keep_mlp)
    }
}

#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub cls_token: Param<Tensor<B, 3>>,
    pub mask_token: Param<Tensor<B, 3>>,
    pub pos_embed: Option<Param<Tensor<B, 3>>>,
    pub rel_pos_bias: Option<RelativePositionBias<B>>,
    pub blocks: Vec<VitBlock<B>>,
    pub norm: LayerNorm<B>,
}

impl<B: SimMimBackend> Vit<B> {
    pub fn new(config: &VitConfig, init: &mut WeightInit, device: &B::Device) -> Self {
        let c = config;
        let grid = c.patches_resolution();
        let dim = c.embed_dim;
        let rates = drop_path_schedule(c.drop_path_rate, c.depth);
        // The official code enables layer scale only for a positive init value.
        let layer_scale = c.init_values.filter(|v| *v > 0.0);
        let blocks = (0..c.depth)
            .map(|layer| {
                let mut mlp = Mlp::new(init, dim, c.mlp_ratio, device);
                let mut proj = linear(init, dim, dim, true, device);
                // `fix_init_weight`: deeper residual branches start smaller.
                let rescale = (2.0 * (layer + 1) as f64).sqrt();
                proj.weight = proj
                    .weight
                    .map(|w| w.div_scalar(rescale).detach().require_grad());
                mlp.fc2.weight = mlp
                    .fc2
                    .weight
                    .map(|w| w.div_scalar(rescale).detach().require_grad());
                let table = c
                    .use_rpb
                    .then(|| RelativePositionBias::new(grid, c.num_heads, device));
                VitBlock {
                    norm1: layer_norm(dim, VIT_LN_EPS, device),
                    attn: VitAttention {
                        qkv: linear(init, dim, 3 * dim, false, device),
                        q_bias: c.qkv_bias.then(|| constant([dim], 0.0, device)),
                        v_bias: c.qkv_bias.then(|| constant([dim], 0.0, device)),
                        relative_position_index: table
                            .as_ref()
                            .map(|t| t.relative_position_index.clone()),
                        relative_position_bias_table: table.map(|t| t.relative_position_bias_table),
                        proj,
                        num_heads: c.num_heads,
                    },
                    norm2: layer_norm(dim, VIT_LN_EPS, device),
                    mlp,
                    gamma_1: layer_scale.map(|v| constant([dim], v as f32, device)),
                    gamma_2: layer_scale.map(|v| constant([dim], v as f32, device)),
                    drop_path: rates[layer],
                }
            })
            .collect();
        Self {
            patch_embed: PatchEmbed::new(init, c.in_chans, c.patch_size, dim, false, device),
            cls_token: init.trunc_normal([1, 1, dim], 0.02, device),
            mask_token: init.trunc_normal([1, 1, dim], 0.02, device),
            pos_embed: c
                .use_ape
                .then(|| init.trunc_normal([1, grid * grid + 1, dim], 0.02, device)),
            rel_pos_bias: c
                .use_shared_rpb
                .then(|| RelativePositionBias::new(grid, c.num_heads, device)),
            blocks,
            norm: layer_norm(dim, VIT_LN_EPS, device),
        }
    }

    /// `images` `[B, C, H, W]`, `mask` `[B, L]` to the patch tokens `[B, L, C]` (cls dropped).
    pub fn forward(&self, images: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let mut x = self.stem(images, mask);
        let shared = self.rel_pos_bias.as_ref().map(|b| b.forward());
        for block in &self.blocks {
            let keep = training_keep(block.drop_path, x.dims()[0], &x.device());
            x = block.forward_with(x, shared.as_ref(), keep.as_ref());
        }
        self.finish(x)
    }

    /// Patch embedding, mask token, cls token and position embedding: `[B, 1 + L, C]`.
    pub(crate) fn stem(&self, images: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let mut x = self.patch_embed.forward(images);
        let [batch, _, dim] = x.dims();
        if let Some(mask) = mask {
            let w = mask.unsqueeze_dim::<3>(2);
            x = x * (w.clone().neg().add_scalar(1.0)) + self.mask_token.val() * w;
        }
        let cls = self.cls_token.val().expand([batch, 1, dim]);
        x = Tensor::cat(vec![cls, x], 1);
        if let Some(pos) = &self.pos_embed {
            x = x + pos.val();
        }
        x
    }

    /// Block `index` alone, its shared position bias computed from the table (so the block's
    /// graph reaches the shared table too).
    pub(crate) fn block(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        keep: Option<&DropKeep<B>>,
    ) -> Tensor<B, 3> {
        let shared = self.rel_pos_bias.as_ref().map(|b| b.forward());
        self.blocks[index].forward_with(x, shared.as_ref(), keep)
    }

    pub(crate) fn draw_keep(
        &self,
        index: usize,
        batch: usize,
        device: &B::Device,
    ) -> Option<DropKeep<B>> {
        draw_keep(self.blocks[index].drop_path, batch, device)
    }

    /// The final norm, without the cls token.
    pub(crate) fn finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let tokens = x.dims()[1] - 1;
        self.norm.forward(x).narrow(1, 1, tokens)
    }
}
