//! The backward passes of the fused ops, as Burn autodiff nodes: each stores what its
//! backward needs (attention's probabilities, LayerNorm's input) and calls the inner backend's
//! backward op.

use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorMetadata;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};

use super::SimMimBackend;

impl<B: SimMimBackend, C: CheckpointStrategy> SimMimBackend for Autodiff<B, C> {
    fn has_attention_kernel() -> bool {
        B::has_attention_kernel()
    }

    fn computes_on_host() -> bool {
        B::computes_on_host()
    }

    fn qkv_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attention;

        /// The projection and the probabilities (the backward recomputes nothing else),
        /// the bias's leading size and the scale.
        type State<B> = (FloatTensor<B>, FloatTensor<B>, usize, f64);

        impl<B: SimMimBackend> Backward<B, 2> for Attention {
            type State = State<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (qkv, probs, bias_groups, scale) = ops.state;
                let [qkv_parent, bias_parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (d_qkv, d_bias) =
                    B::qkv_attention_backward(qkv, probs, grad, bias_groups, scale);
                for (parent, gradient) in [(qkv_parent, d_qkv), (bias_parent, d_bias)] {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, gradient);
                    }
                }
            }
        }

        let bias_groups = bias.primitive.shape()[0];
        match Attention
            .prepare::<C>([qkv.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, probs) = B::qkv_attention_with_probs(
                    qkv.primitive.clone(),
                    bias.primitive,
                    heads,
                    scale,
                );
                prep.finish((qkv.primitive, probs, bias_groups, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::qkv_attention(
                qkv.primitive,
                bias.primitive,
                heads,
                scale,
            )),
        }
    }

    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SoftmaxLast;

        impl<B: SimMimBackend> Backward<B, 1> for SoftmaxLast {
            /// The forward output, which is all the backward needs.
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let output = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::softmax_last_backward(output, grad)
                });
            }
        }

        match SoftmaxLast
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::softmax_last(x.primitive);
                prep.finish(output.clone(), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_last(x.primitive)),
        }
    }

    fn layer_norm_affine(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormAffine;

        impl<B: SimMimBackend> Backward<B, 3> for LayerNormAffine {
            type State = (NodeId, NodeId, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (x_state, gamma_state, epsilon) = ops.state;
                let [x_parent, gamma_parent, beta_parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_state);
                let gamma: FloatTensor<B> = checkpointer.retrieve_node_output(gamma_state);
                let [dx, dgamma, dbeta] = B::layer_norm_affine_backward(x, gamma, grad, epsilon);
                for (parent, gradient) in
                    [(x_parent, dx), (gamma_parent, dgamma), (beta_parent, dbeta)]
                {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, gradient);
                    }
                }
            }
        }

        match LayerNormAffine
            .prepare::<C>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let output = B::layer_norm_affine(
                    x.primitive.clone(),
                    gamma.primitive.clone(),
                    beta.primitive.clone(),
                    epsilon,
                );
                prep.finish((x_state, gamma_state, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_affine(
                x.primitive,
                gamma.primitive,
                beta.primitive,
                epsilon,
            )),
        }
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluExact;

        impl<B: SimMimBackend> Backward<B, 1> for GeluExact {
            type State = NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let input: FloatTensor<B> = checkpointer.retrieve_node_output(ops.state);
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::gelu_exact_backward(input, grad)
                });
            }
        }

        match GeluExact
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::gelu_exact(x.primitive.clone()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_exact(x.primitive)),
        }
    }
}
