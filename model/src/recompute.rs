//! Activation checkpointing (`train.activation_checkpointing: blocks`): the loss and gradients
//! of a SimMIM pass for which only each Transformer block's input is kept, the block being
//! computed again when its gradient is needed, as `torch.utils.checkpoint` around every block
//! (the official `use_checkpoint`).
//!
//! Burn's autodiff cannot run a graph inside another graph's backward pass (its backward holds
//! the graph's lock and a nested backward's cleanup waits for it), so the recomputation is
//! driven from outside: one forward pass without a graph keeps the block inputs; the tail
//! (final norm, head, loss) is differentiated from the last block's output; then every block,
//! last first, is computed again with a graph of its own and differentiated with the gradient
//! of its output; the stem comes last. Peak activation memory is the kept inputs plus one
//! block's graph, instead of every block's graph. Drop path is drawn once per block in the
//! first pass and reused when the block is computed again, so both passes drop the same
//! samples.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::backend::SimMimBackend;
use crate::encoders::layers::DropKeep;
use crate::simmim::SimMim;

/// The loss of `model` on `images` `[B, C, H, W]` and `mask` `[B, h, w]` (after its backward
/// pass) and the gradients of every parameter, equal to a plain forward/backward's to f32
/// rounding.
pub fn recomputed_loss_and_grads<B>(
    model: &SimMim<B>,
    images: Tensor<B, 4>,
    mask: Tensor<B, 3>,
) -> (Tensor<B, 1>, GradientsParams)
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    let inner = model.valid();
    let [batch, rows, cols] = mask.dims();
    let token_mask = mask.clone().reshape([batch, rows * cols]);
    let inner_device = images.clone().inner().device();
    let blocks = inner.encoder.block_count();
    let keeps: Vec<Option<DropKeep<B::InnerBackend>>> = (0..blocks)
        .map(|index| inner.encoder.draw_keep(index, batch, &inner_device))
        .collect();

    // 1. Forward without a graph, keeping each block's input.
    let mut inputs = Vec::with_capacity(blocks);
    let mut x = inner
        .encoder
        .stem(images.clone().inner(), Some(token_mask.clone().inner()));
    for (index, keep) in keeps.iter().enumerate() {
        inputs.push(x.clone());
        x = inner.encoder.block(index, x, keep.as_ref());
    }
    drop(inner);

    // 2. The tail, from the last block's output: final norm, head, loss.
    let last = Tensor::<B, 3>::from_inner(x).require_grad();
    let (loss, _) = model.tail(last.clone(), images.clone(), mask);
    let mut grads = loss.backward();
    let mut upstream = last.grad_remove(&mut grads);
    let mut total = GradientsParams::from_grads(grads, model);

    // 3. Every block again, last first, each with its own graph.
    for (index, keep) in keeps.into_iter().enumerate().rev() {
        let Some(input) = inputs.pop() else { break };
        let input = Tensor::<B, 3>::from_inner(input).require_grad();
        let keep = keep.map(|k| k.map(Tensor::<B, 3>::from_inner));
        let out = model.encoder.block(index, input.clone(), keep.as_ref());
        let Some(grad) = upstream.take() else { break };
        let mut grads = (out * Tensor::from_inner(grad)).sum().backward();
        upstream = input.grad_remove(&mut grads);
        accumulate(model, &mut total, GradientsParams::from_grads(grads, model));
    }

    // 4. The stem.
    if let Some(grad) = upstream {
        let x = model.encoder.stem(images, Some(token_mask));
        let grads = (x * Tensor::from_inner(grad)).sum().backward();
        accumulate(model, &mut total, GradientsParams::from_grads(grads, model));
    }
    (loss, total)
}

/// Adds a segment's gradients into the step's as the segment finishes, so no segment's
/// gradients wait apart until the end (a second copy of the gradients at the peak). A
/// parameter seen first is moved, not copied; only one used by several segments (ViT's shared
/// position bias) is summed.
fn accumulate<B>(model: &SimMim<B>, total: &mut GradientsParams, mut part: GradientsParams)
where
    B: AutodiffBackend + SimMimBackend,
    B::InnerBackend: SimMimBackend,
{
    struct Adder<'a> {
        total: &'a mut GradientsParams,
        part: &'a mut GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Adder<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some(grad) = self.part.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            let sum = match self.total.remove::<B::InnerBackend, D>(param.id) {
                Some(seen) => seen + grad,
                None => grad,
            };
            self.total.register(param.id, sum);
        }
    }
    model.visit(&mut Adder {
        total,
        part: &mut part,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EncoderConfig, SimMimConfig};
    use crate::step::loss_and_grads_with;
    use crate::{mask_tensor, InitModel};
    use burn::backend::Autodiff;
    use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
    use burn::tensor::backend::Backend;
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::Flex;
    use simmim_proto::run_config::ActivationCheckpointing;

    type AD = Autodiff<Flex>;

    /// Every parameter's gradient, in module order.
    fn gradients(model: &SimMim<AD>, grads: &GradientsParams) -> Vec<Vec<f32>> {
        struct Reader<'a>(&'a GradientsParams, Vec<Vec<f32>>);
        impl ModuleVisitor<AD> for Reader<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
                let values = self
                    .0
                    .get::<Flex, D>(param.id)
                    .map(|g| g.into_data().to_vec::<f32>().expect("f32"))
                    .unwrap_or_default();
                self.1.push(values);
            }
        }
        let mut reader = Reader(grads, Vec::new());
        model.visit(&mut reader);
        reader.1
    }

    struct OffInit;
    impl ModuleMapper<AD> for OffInit {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<AD, D>>,
        ) -> Param<Tensor<AD, D>> {
            if D == 1 {
                param.map(|t| t.add_scalar(0.3).detach().require_grad())
            } else {
                param
            }
        }
    }

    fn small(preset: &str, drop_path: f64) -> SimMimConfig {
        let mut config = SimMimConfig::preset(preset).expect("preset");
        match &mut config.encoder {
            EncoderConfig::Swin(c) | EncoderConfig::Swinv2(c) => {
                (c.img_size, c.depths, c.num_heads) = (32, vec![2, 2], vec![3, 6]);
                c.drop_path_rate = drop_path;
            }
            EncoderConfig::Vit(c) => {
                (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) = (32, 8, 32, 3, 2);
                c.drop_path_rate = drop_path;
                config.mask_patch_size = 16;
            }
        }
        config.validate().expect("valid");
        config
    }

    /// Checkpointed blocks give the plain pass's loss and every gradient, for Swin v1, v2 and
    /// ViT (with its shared position bias, used by every block), whole and in sub-batches,
    /// and with drop path: from the same RNG seed both passes draw the same samples to drop
    /// (one draw per block and branch, in block order), and the recomputed block reuses its
    /// draw instead of drawing again.
    #[test]
    fn recomputed_blocks_give_the_same_gradients() {
        let cases = ["swin_micro", "swinv2_micro", "vit_base"]
            .into_iter()
            .flat_map(|preset| [(preset, 0.0, 1), (preset, 0.0, 2), (preset, 0.3, 1)]);
        for (preset, drop_path, sub_batches) in cases {
            let config = small(preset, drop_path);
            let device = Default::default();
            // SwinV2's res-post-norms start at zero, which zeroes its branches' gradients:
            // every 1-D parameter moved off its init, so every path carries a gradient.
            let model = config
                .init::<AD>(3, &device)
                .expect("init")
                .map(&mut OffInit);
            let geometry = config.mask_geometry().expect("geometry");
            let batch = 4;
            let masks: Vec<u8> = (0..batch as u64)
                .flat_map(|i| geometry.generate(i))
                .collect();
            let mask = mask_tensor::<AD>(&masks, batch, geometry.token_grid(), &device);
            let side = config.encoder.img_size();
            let images = Tensor::<AD, 4>::random(
                [batch, 3, side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            {
                let run = |mode| {
                    AD::seed(&device, 11);
                    let (loss, grads) = loss_and_grads_with(
                        &model,
                        images.clone(),
                        mask.clone(),
                        sub_batches,
                        mode,
                    );
                    (loss, gradients(&model, &grads))
                };
                let (loss, plain) = run(ActivationCheckpointing::None);
                let (loss_again, recomputed) = run(ActivationCheckpointing::Blocks);
                assert!(
                    (loss - loss_again).abs() <= 1e-6 * loss.abs(),
                    "{preset}: {loss} vs {loss_again}"
                );
                assert_eq!(plain.len(), recomputed.len());
                let mut nonzero = 0;
                for (index, (a, b)) in plain.iter().zip(&recomputed).enumerate() {
                    assert_eq!(
                        a.len(),
                        b.len(),
                        "{preset}: parameter {index} has no gradient"
                    );
                    let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
                    let gap = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        gap <= 1e-4 * scale,
                        "{preset} parameter {index}: {gap} of {scale}"
                    );
                    nonzero += usize::from(scale > 1e-9);
                }
                assert!(
                    nonzero > plain.len() / 2,
                    "{preset}: gradients are mostly zero"
                );
            }
        }
    }
}
