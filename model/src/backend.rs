//! The backends the model runs on, and the ops it brings itself.
//!
//! - Exact (erf) GELU: burn-flex evaluates GELU and its gradient element by element through a
//!   scalar `erff` and `expf` on one thread. The CPU kernel here uses a rational erf
//!   approximation and a range-reduced exp that the compiler vectorises, split across threads.
//! - LayerNorm with a fused backward: Burn's autodiff differentiates LayerNorm through its
//!   decomposition (mean, subtract, square, mean, sqrt, divide, scale, shift), storing each
//!   intermediate and running about fifteen passes backward. Here the forward is the
//!   backend's fused LayerNorm and the backward one pass per row (two on the CPU kernel).
//!
//! - Softmax over the last dimension with a fused backward (`y * (g - sum(g * y))` per row)
//!   instead of the decomposition's max, subtract, exp, sum and divide.
//!
//! Backends without their own kernels use Burn's ops through the trait's defaults.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{ActivationOps, FloatTensor};
use burn::tensor::{DType, Scalar, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::attention;
use crate::attention_kernel;
use crate::optim::{adamw_update_decomposed, AdamWUpdate};
use crate::optim_kernel;

/// A primitive float tensor as a `Tensor` of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A Burn backend the SimMIM model can run on.
pub trait SimMimBackend: Backend {
    /// `x * Φ(x)` with the exact normal CDF, as `torch.nn.GELU()`.
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad * d/dx[x * Φ(x)]`.
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }

    /// Softmax over the last dimension.
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let last = x.shape().num_dims() - 1;
        Self::softmax(x, last)
    }

    /// Gradient of [`Self::softmax_last`] from its output `y`: `y * (grad - sum(grad * y))`.
    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_backward_decomposed::<Self>(y, grad)
    }

    /// LayerNorm over the last dimension (biased variance, as PyTorch).
    fn layer_norm_affine(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        Self::layer_norm(x, gamma, Some(beta), epsilon)
    }

    /// Gradients of [`Self::layer_norm_affine`] with respect to `x`, `gamma` and `beta`.
    fn layer_norm_affine_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 3] {
        layer_norm_backward_decomposed::<Self>(x, gamma, grad, epsilon)
    }

    /// Whether [`Self::qkv_attention`] is this backend's own kernel, so the model hands attention
    /// to it (see [`crate::attention`]); Burn's ops otherwise.
    fn has_attention_kernel() -> bool {
        false
    }

    /// Whether this backend's kernels run on the host's cores. There a batch split into
    /// concurrent sub-batches keeps every core busy while one sub-batch sits in a narrow
    /// kernel; on a GPU the batch is one stream of kernels, and splitting it only makes each
    /// kernel smaller and multiplies the launches, so the trainer runs it whole.
    fn computes_on_host() -> bool {
        true
    }

    /// Attention over a fused qkv projection `[G, N, 3C]` with `bias` `[P, heads, N, N]`,
    /// heads merged: `[G, N, C]` (see [`crate::attention::attention`]).
    fn qkv_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::qkv_attention_with_probs(qkv, bias, heads, scale).0
    }

    /// [`Self::qkv_attention`] and its softmax probabilities `[G, heads, N, N]`, which the
    /// backward needs.
    fn qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, probs) =
            attention::forward_decomposed::<Self>(float(qkv), float(bias), heads, scale);
        (
            out.into_primitive().tensor(),
            probs.into_primitive().tensor(),
        )
    }

    /// Gradients of [`Self::qkv_attention`]: `(d_qkv, d_bias)`, `d_bias` with `bias_groups` rows.
    fn qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        bias_groups: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_qkv, d_bias) = attention::backward_decomposed::<Self>(
            float(qkv),
            float(probs),
            float(grad),
            bias_groups,
            scale,
        );
        (
            d_qkv.into_primitive().tensor(),
            d_bias.into_primitive().tensor(),
        )
    }

    /// One AdamW update of a flat parameter: `[value, first, second]`, each a new tensor
    /// (a checkpoint may still hold the old ones).
    fn adamw_update(
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: &AdamWUpdate,
    ) -> [FloatTensor<Self>; 3] {
        adamw_update_decomposed::<Self>(value, grad, moments, update)
    }

    /// `sum_i weights[i] * parts[i]` over same-shaped tensors, accumulated left to right in
    /// the tensors' precision: sub-batch gradients into the batch's, micro-steps into a step's.
    fn weighted_sum(parts: Vec<FloatTensor<Self>>, weights: &[f64]) -> Option<FloatTensor<Self>> {
        weighted_sum_decomposed::<Self>(parts, weights)
    }

    /// Lends a contiguous f32 tensor's device memory to `use_memory` as (device address,
    /// value count), for a library that reads and writes it in place (NCCL); `None` where the
    /// backend has no such memory (the CPU) or cannot lend it. The memory is valid, and the
    /// kernels that produced it have finished, for the duration of the call; values written
    /// there are what every other handle to the tensor reads afterwards.
    fn with_device_memory<R>(
        tensor: FloatTensor<Self>,
        use_memory: impl FnOnce(Option<(u64, usize)>) -> R,
    ) -> R {
        let _ = tensor;
        use_memory(None)
    }
}

impl SimMimBackend for Flex {
    fn has_attention_kernel() -> bool {
        true
    }

    fn weighted_sum(parts: Vec<FloatTensor<Self>>, weights: &[f64]) -> Option<FloatTensor<Self>> {
        let parts: Vec<FlexTensor> = parts.into_iter().map(|t| t.to_contiguous()).collect();
        let first = parts.first()?;
        let shape = first.layout().shape().clone();
        let slices: Option<Vec<&[f32]>> = parts
            .iter()
            .map(|t| {
                t.as_slice::<f32>()
                    .filter(|s| s.len() == shape.num_elements())
            })
            .collect();
        match slices.and_then(|slices| optim_kernel::weighted_sum(&slices, weights)) {
            Some(sum) => Some(FlexTensor::from_data(TensorData::new(sum, shape))),
            None => weighted_sum_decomposed::<Self>(parts, weights),
        }
    }

    fn adamw_update(
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: &AdamWUpdate,
    ) -> [FloatTensor<Self>; 3] {
        let contiguous = |t: FloatTensor<Self>| t.to_contiguous();
        let (value, grad) = (contiguous(value), contiguous(grad));
        let moments = moments.map(|(m, v)| (contiguous(m), contiguous(v)));
        // `as_slice` is `None` for a tensor that is not f32: the decomposition takes those.
        let slices = (
            value.as_slice::<f32>(),
            grad.as_slice::<f32>(),
            moments
                .as_ref()
                .map(|(m, v)| (m.as_slice::<f32>(), v.as_slice::<f32>())),
        );
        let shape = value.layout().shape().clone();
        let kernel = match slices {
            (Some(w), Some(g), None) => Some(optim_kernel::adamw(w, g, None, update)),
            (Some(w), Some(g), Some((Some(m), Some(v)))) => {
                Some(optim_kernel::adamw(w, g, Some((m, v)), update))
            }
            _ => None,
        };
        match kernel.flatten() {
            Some(outputs) => {
                outputs.map(|values| FlexTensor::from_data(TensorData::new(values, shape.clone())))
            }
            None => adamw_update_decomposed::<Self>(value, grad, moments, update),
        }
    }

    fn qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (qkv, bias) = (qkv.to_contiguous(), bias.to_contiguous());
        let kernel = match (qkv.as_slice::<f32>(), bias.as_slice::<f32>()) {
            (Some(q), Some(b)) => {
                let bias_dims = bias.layout().shape();
                let lengths = attention_kernel::Lengths {
                    qkv: q.len(),
                    bias: Some(b.len()),
                    ..Default::default()
                };
                (bias_dims.num_dims() == 4)
                    .then(|| {
                        attention_kernel::Shape::of(
                            qkv.layout().shape(),
                            heads,
                            bias_dims[0],
                            lengths,
                        )
                    })
                    .flatten()
                    .map(|shape| (shape, q, b))
            }
            _ => None,
        };
        let Some((shape, q, b)) = kernel else {
            let (out, probs) =
                attention::forward_decomposed::<Self>(float(qkv), float(bias), heads, scale);
            return (
                out.into_primitive().tensor(),
                probs.into_primitive().tensor(),
            );
        };
        let (out, probs) = attention_kernel::forward(q, b, shape, scale as f32);
        let (g, n, c) = (shape.groups, shape.tokens, shape.dim);
        (
            FlexTensor::from_data(TensorData::new(out, [g, n, c])),
            FlexTensor::from_data(TensorData::new(probs, [g, heads, n, n])),
        )
    }

    fn qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        bias_groups: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (qkv, probs, grad) = (
            qkv.to_contiguous(),
            probs.to_contiguous(),
            grad.to_contiguous(),
        );
        let qkv_shape = qkv.layout().shape().clone();
        let slices = (
            qkv.as_slice::<f32>(),
            probs.as_slice::<f32>(),
            grad.as_slice::<f32>(),
        );
        let kernel = match slices {
            (Some(q), Some(p), Some(g)) if probs.layout().shape().num_dims() == 4 => {
                let lengths = attention_kernel::Lengths {
                    qkv: q.len(),
                    probs: Some(p.len()),
                    out: Some(g.len()),
                    ..Default::default()
                };
                let heads = probs.layout().shape()[1];
                attention_kernel::Shape::of(&qkv_shape, heads, bias_groups, lengths)
                    .map(|shape| (shape, q, p, g))
            }
            _ => None,
        };
        let Some((shape, q, p, g)) = kernel else {
            let (d_qkv, d_bias) = attention::backward_decomposed::<Self>(
                float(qkv),
                float(probs),
                float(grad),
                bias_groups,
                scale,
            );
            return (
                d_qkv.into_primitive().tensor(),
                d_bias.into_primitive().tensor(),
            );
        };
        let (d_qkv, d_bias) = attention_kernel::backward(q, p, g, shape, scale as f32);
        let (n, heads) = (shape.tokens, shape.heads);
        (
            FlexTensor::from_data(TensorData::new(d_qkv, qkv_shape)),
            FlexTensor::from_data(TensorData::new(d_bias, [bias_groups, heads, n, n])),
        )
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Self::gelu(x);
        }
        let x = x.to_contiguous();
        let shape = x.layout().shape().clone();
        let Some(input) = x.as_slice::<f32>() else {
            return Self::gelu(x);
        };
        let out = map_parallel(input, None, |x, _| gelu(x));
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return Self::gelu_backward(x, grad);
        }
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        let shape = x.layout().shape().clone();
        let (Some(input), Some(upstream)) = (x.as_slice::<f32>(), grad.as_slice::<f32>()) else {
            return Self::gelu_backward(x, grad);
        };
        if input.len() != upstream.len() {
            return Self::gelu_backward(x, grad);
        }
        let out = map_parallel(input, Some(upstream), |x, g| g * gelu_derivative(x));
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (y, grad) = (y.to_contiguous(), grad.to_contiguous());
        let shape = y.layout().shape().clone();
        let width = shape[shape.num_dims() - 1];
        let f32s = y.dtype() == DType::F32 && grad.dtype() == DType::F32;
        let (Some(ys), Some(gs)) = (y.as_slice::<f32>(), grad.as_slice::<f32>()) else {
            return softmax_backward_decomposed::<Flex>(y, grad);
        };
        if !f32s || width == 0 || ys.len() != gs.len() {
            return softmax_backward_decomposed::<Flex>(y, grad);
        }
        let mut out = vec![0f32; ys.len()];
        let rows_per_task = (1usize << 15).div_ceil(width);
        for_row_blocks(&mut out, width, rows_per_task, |start, block| {
            let (ys, gs) = (
                &ys[start..start + block.len()],
                &gs[start..start + block.len()],
            );
            for ((o, y), g) in block
                .chunks_exact_mut(width)
                .zip(ys.chunks_exact(width))
                .zip(gs.chunks_exact(width))
            {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for k in 0..width {
                    o[k] = y[k] * (g[k] - dot);
                }
            }
        });
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn layer_norm_affine_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 3] {
        let all_f32 = [&x, &gamma, &grad].iter().all(|t| t.dtype() == DType::F32);
        let (x, gamma, grad) = (
            x.to_contiguous(),
            gamma.to_contiguous(),
            grad.to_contiguous(),
        );
        let shape = x.layout().shape().clone();
        let gamma_shape = gamma.layout().shape().clone();
        let slices = (
            x.as_slice::<f32>(),
            gamma.as_slice::<f32>(),
            grad.as_slice::<f32>(),
        );
        let (Some(xs), Some(gs), Some(ds)) = slices else {
            return layer_norm_backward_decomposed::<Flex>(x, gamma, grad, epsilon);
        };
        if !all_f32 || gs.is_empty() || xs.len() != ds.len() || xs.len() % gs.len() != 0 {
            return layer_norm_backward_decomposed::<Flex>(x, gamma, grad, epsilon);
        }
        let (dx, dgamma, dbeta) = layer_norm_backward_rows(xs, gs, ds, epsilon as f32);
        [
            FlexTensor::from_data(TensorData::new(dx, shape)),
            FlexTensor::from_data(TensorData::new(dgamma, gamma_shape.clone())),
            FlexTensor::from_data(TensorData::new(dbeta, gamma_shape)),
        ]
    }
}

/// Softmax backward from Burn tensor ops (for inputs the CPU kernel does not take).
/// Burn's ops for [`SimMimBackend::weighted_sum`]; `None` without parts.
pub(crate) fn weighted_sum_decomposed<B: Backend>(
    parts: Vec<FloatTensor<B>>,
    weights: &[f64],
) -> Option<FloatTensor<B>> {
    parts
        .into_iter()
        .zip(weights)
        .map(|(part, &w)| {
            let w = Scalar::new(w, &part.dtype());
            B::float_mul_scalar(part, w)
        })
        .reduce(B::float_add)
}

fn softmax_backward_decomposed<B: Backend>(
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = y.shape();
    let width = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / width;
    let matrix = |t: FloatTensor<B>| {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).reshape([rows, width])
    };
    let (y, grad) = (matrix(y), matrix(grad));
    let dot = (grad.clone() * y.clone()).sum_dim(1);
    B::float_reshape((y * (grad - dot)).into_primitive().tensor(), shape)
}

/// The machine's cores. Kernels split their work (and their partial sums) by this, not by
/// `rayon::current_num_threads()`: a sub-batch runs inside a pool with a share of the cores
/// (`step::part_pools`), and a result must not depend on which pool computed it.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work(first_element, block)` over blocks of whole rows of `out` on all cores.
fn for_row_blocks(
    out: &mut [f32],
    width: usize,
    rows_per_task: usize,
    work: impl Fn(usize, &mut [f32]) + Sync,
) {
    let threads = cores();
    let rows = out.len() / width.max(1);
    if threads == 1 || rows <= rows_per_task {
        work(0, out);
        return;
    }
    let block = rows.div_ceil(threads) * width;
    // rayon's threads, not fresh OS threads: a kernel runs hundreds of times a step, and
    // spawning (stack mapping, and unmapping's TLB flushes) cost more than small blocks.
    out.par_chunks_mut(block)
        .enumerate()
        .for_each(|(index, chunk)| work(index * block, chunk));
}

/// LayerNorm backward from Burn tensor ops: the default for backends without a kernel.
fn layer_norm_backward_decomposed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> [FloatTensor<B>; 3] {
    let shape = x.shape();
    let width = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / width;
    let matrix = |t: FloatTensor<B>| {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).reshape([rows, width])
    };
    let (x, grad) = (matrix(x), matrix(grad));
    let gamma = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(gamma));
    let centered = x.clone() - x.mean_dim(1);
    let rstd = centered
        .clone()
        .square()
        .mean_dim(1)
        .add_scalar(epsilon)
        .sqrt()
        .recip();
    let normalized = centered * rstd.clone();
    let d_normalized = grad.clone() * gamma.unsqueeze_dim(0);
    let mean_d = d_normalized.clone().mean_dim(1);
    let mean_d_dot = (d_normalized.clone() * normalized.clone()).mean_dim(1);
    let dx = (d_normalized - mean_d - normalized.clone() * mean_d_dot) * rstd;
    let dgamma = (grad.clone() * normalized).sum_dim(0).reshape([width]);
    let dbeta = grad.sum_dim(0).reshape([width]);
    [
        B::float_reshape(dx.into_primitive().tensor(), shape),
        dgamma.into_primitive().tensor(),
        dbeta.into_primitive().tensor(),
    ]
}

#[cfg(feature = "ndarray")]
impl SimMimBackend for burn_ndarray::NdArray {}

/// Whether the CUDA driver library can be loaded. burn-cuda (through cudarc) panics on first
/// use when it cannot, so callers check first and report a clear error instead.
#[cfg(feature = "cuda")]
pub fn cuda_driver_present() -> bool {
    // SAFETY: only attempts to load the shared library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[cfg(feature = "cuda")]
impl SimMimBackend for burn_cuda::Cuda<f32> {
    fn computes_on_host() -> bool {
        false
    }

    fn with_device_memory<R>(
        tensor: FloatTensor<Self>,
        use_memory: impl FnOnce(Option<(u64, usize)>) -> R,
    ) -> R {
        cuda_memory::with_f32(tensor, use_memory)
    }
}

/// burn-cuda's memory for an external library (see [`SimMimBackend::with_device_memory`]).
#[cfg(feature = "cuda")]
mod cuda_memory {
    use burn::tensor::DType;
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeBackend;
    use burn_fusion::FusionTensor;

    type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

    pub fn with_f32<R>(
        tensor: FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<CudaRuntime>>,
        use_memory: impl FnOnce(Option<(u64, usize)>) -> R,
    ) -> R {
        if tensor.dtype != DType::F32 {
            return use_memory(None);
        }
        // Resolving a clone (while `tensor` lives) leaves the buffer registered with fusion,
        // so later reads of the tensor see what was written into it; resolving runs the
        // tensor's pending fused kernels first.
        let cube: CubeTensor<CudaRuntime> =
            tensor.client.resolve_tensor_float::<Cube>(tensor.clone());
        if !cube.is_contiguous() {
            return use_memory(None);
        }
        // Taking the resource orders this thread's stream after the producers' stream; the
        // sync then waits for them, so the memory holds the values before anyone reads it.
        let Ok(resource) = cube.client.get_resource(cube.handle.clone()) else {
            return use_memory(None);
        };
        if burn_cubecl::cubecl::future::block_on(cube.client.sync()).is_err() {
            return use_memory(None);
        }
        let count = cube.meta.shape().num_elements();
        let out = use_memory(Some((resource.resource().ptr, count)));
        drop((resource, cube, tensor));
        out
    }
}
#[cfg(feature = "cuda")]
impl SimMimBackend for burn_cuda::Cuda<burn::tensor::bf16> {
    fn computes_on_host() -> bool {
        false
    }
}
#[cfg(feature = "cuda")]
impl SimMimBackend for burn_cuda::Cuda<burn::tensor::f16> {
    fn computes_on_host() -> bool {
        false
    }
}

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

/// LayerNorm backward over rows of `gamma.len()`: `(dx, dgamma, dbeta)`. Mean and inverse
/// deviation are recomputed per row (cheaper than storing them); rows are split across
/// threads, each with its own `dgamma`/`dbeta` partial sums.
fn layer_norm_backward_rows(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    epsilon: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let rows = x.len() / width;
    let mut dx = vec![0f32; x.len()];
    let threads = cores();
    let threads = if rows * width < 1 << 16 { 1 } else { threads };
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(rows_per_thread * width)
        .enumerate()
        .map(|(index, dx)| {
            let start = index * rows_per_thread * width;
            let x = &x[start..start + dx.len()];
            let grad = &grad[start..start + dx.len()];
            layer_norm_backward_block(x, gamma, grad, epsilon, dx)
        })
        .collect();
    let mut dgamma = vec![0f32; width];
    let mut dbeta = vec![0f32; width];
    for (pg, pb) in partials {
        for k in 0..width {
            dgamma[k] += pg[k];
            dbeta[k] += pb[k];
        }
    }
    (dx, dgamma, dbeta)
}

fn layer_norm_backward_block(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    epsilon: f32,
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let inv_width = 1.0 / width as f32;
    let mut dgamma = vec![0f32; width];
    let mut dbeta = vec![0f32; width];
    for ((row, g), out) in x
        .chunks_exact(width)
        .zip(grad.chunks_exact(width))
        .zip(dx.chunks_exact_mut(width))
    {
        let mean = row.iter().sum::<f32>() * inv_width;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() * inv_width;
        let rstd = 1.0 / (var + epsilon).sqrt();
        let (mut mean_d, mut mean_d_dot) = (0f32, 0f32);
        for k in 0..width {
            let normalized = (row[k] - mean) * rstd;
            let d = g[k] * gamma[k];
            mean_d += d;
            mean_d_dot += d * normalized;
            dgamma[k] += g[k] * normalized;
            dbeta[k] += g[k];
        }
        mean_d *= inv_width;
        mean_d_dot *= inv_width;
        for k in 0..width {
            let normalized = (row[k] - mean) * rstd;
            out[k] = rstd * (g[k] * gamma[k] - mean_d - normalized * mean_d_dot);
        }
    }
    (dgamma, dbeta)
}

/// Applies `op(x[i], g[i])` over chunks on all cores (`g` is 0 when absent).
fn map_parallel(
    input: &[f32],
    other: Option<&[f32]>,
    op: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    for_row_blocks(&mut out, 1, 1 << 17, |start, block| {
        let end = start + block.len();
        apply(
            block,
            &input[start..end],
            other.map(|o| &o[start..end]),
            &op,
        );
    });
    out
}

#[inline(always)]
fn apply(out: &mut [f32], input: &[f32], other: Option<&[f32]>, op: &impl Fn(f32, f32) -> f32) {
    match other {
        Some(other) => {
            for ((o, &x), &g) in out.iter_mut().zip(input).zip(other) {
                *o = op(x, g);
            }
        }
        None => {
            for (o, &x) in out.iter_mut().zip(input) {
                *o = op(x, 0.0);
            }
        }
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
    cdf + x * FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
}

/// erf for f32: odd/even rational minimax approximation on [-4, 4] (|error| about 1e-7,
/// the float's own resolution), saturating outside, where erf is ±1 in f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_1e-3;
    p = p * x2 - 1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_473_9e-2;
    p / q
}

/// e^y for y <= 0: y = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, and 2^n
/// built in the exponent bits. Relative error about 2e-7; inputs below -87 give e^-87
/// (1.6e-38), which is zero for every use here.
#[inline(always)]
pub(crate) fn exp_nonpositive(y: f32) -> f32 {
    let y = y.max(-87.0);
    // Round to nearest with the 1.5 * 2^23 trick (vectorises without SSE4.1's round).
    const SHIFTER: f32 = 12_582_912.0;
    let n = (y * std::f32::consts::LOG2_E + SHIFTER) - SHIFTER;
    let r = y - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut e = 1.0 / 720.0_f32;
    e = e * r + 1.0 / 120.0;
    e = e * r + 1.0 / 24.0;
    e = e * r + 1.0 / 6.0;
    e = e * r + 0.5;
    e = e * r + 1.0;
    e = e * r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    e * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_f64(x: f64) -> f64 {
        // erf through the complementary function's continued fraction is overkill; the
        // Abramowitz-Stegun 7.1.26 bound (1.5e-7) is not tight enough, so integrate instead.
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut sum = f(0.0) + f(x);
        for i in 1..n {
            sum += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        sum * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// The fused LayerNorm (Flex kernel, and the decomposed default on NdArray-free Flex
    /// fallback) against Burn's LayerNorm differentiated through its decomposition.
    #[test]
    fn layer_norm_gradients_match_burns_decomposition() {
        use burn::backend::Autodiff;
        use burn::nn::LayerNormConfig;
        use burn::tensor::Distribution;
        type AD = Autodiff<Flex>;
        let device = Default::default();
        for rows in [300, 2000] {
            let width = 48;
            let x = Tensor::<AD, 2>::random([rows, width], Distribution::Normal(0.5, 2.0), &device)
                .require_grad();
            let upstream =
                Tensor::<AD, 2>::random([rows, width], Distribution::Normal(0.0, 1.0), &device);
            let mut reference = LayerNormConfig::new(width)
                .with_epsilon(1e-5)
                .init::<AD>(&device);
            reference.gamma = reference.gamma.map(|g| {
                Tensor::random([width], Distribution::Normal(1.0, 0.3), &device).require_grad()
                    + g.zeros_like()
            });
            let ours = crate::layers::LayerNorm::<AD> {
                gamma: reference.gamma.clone(),
                beta: reference.beta.clone().expect("beta"),
                epsilon: 1e-5,
            };
            let run = |y: Tensor<AD, 2>| {
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let get = |t: Option<Tensor<Flex, 2>>| {
                    t.expect("grad").into_data().to_vec::<f32>().expect("f32")
                };
                (
                    y.into_data().to_vec::<f32>().expect("f32"),
                    get(x.grad(&grads)),
                )
            };
            let (y_ref, dx_ref) = run(reference.forward(x.clone()));
            let (y_ours, dx_ours) = run(ours.forward(x.clone()));
            let max_diff =
                |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(max_diff(&y_ref, &y_ours) < 1e-5, "forward differs");
            assert!(
                max_diff(&dx_ref, &dx_ours) < 1e-4,
                "dx differs: {}",
                max_diff(&dx_ref, &dx_ours)
            );

            // Parameter gradients, and the decomposed default on the same inputs.
            let xs = x.clone().inner();
            let g = upstream.clone().inner();
            let gamma = reference.gamma.val().inner();
            let [_, dgamma, dbeta] = <Flex as SimMimBackend>::layer_norm_affine_backward(
                xs.clone().into_primitive().tensor(),
                gamma.clone().into_primitive().tensor(),
                g.clone().into_primitive().tensor(),
                1e-5,
            );
            let [dx_dec, dgamma_dec, dbeta_dec] = layer_norm_backward_decomposed::<Flex>(
                xs.into_primitive().tensor(),
                gamma.into_primitive().tensor(),
                g.into_primitive().tensor(),
                1e-5,
            );
            let vec = |t: FlexTensor| t.into_data().to_vec::<f32>().expect("f32");
            assert!(max_diff(&vec(dx_dec), &dx_ref) < 1e-4);
            let (dgamma, dgamma_dec) = (vec(dgamma), vec(dgamma_dec));
            let (dbeta, dbeta_dec) = (vec(dbeta), vec(dbeta_dec));
            let scale = dbeta_dec.iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(max_diff(&dgamma, &dgamma_dec) < 1e-4 * scale, "dgamma");
            assert!(max_diff(&dbeta, &dbeta_dec) < 1e-4 * scale, "dbeta");
        }
    }

    #[test]
    fn softmax_gradient_matches_burns_decomposition() {
        use burn::backend::Autodiff;
        use burn::tensor::{activation, Distribution};
        type AD = Autodiff<Flex>;
        let device = Default::default();
        for shape in [[3, 2, 5, 7], [512, 3, 16, 16]] {
            let x = Tensor::<AD, 4>::random(shape, Distribution::Normal(0.0, 3.0), &device)
                .require_grad();
            let upstream = Tensor::<AD, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let run = |y: Tensor<AD, 4>| {
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let dx = x.grad(&grads).expect("grad");
                (
                    y.into_data().to_vec::<f32>().expect("f32"),
                    dx.into_data().to_vec::<f32>().expect("f32"),
                )
            };
            let (y_ref, dx_ref) = run(activation::softmax(x.clone(), 3));
            let (y, dx) = run(crate::layers::softmax_last(x.clone()));
            let max_diff =
                |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(max_diff(&y, &y_ref) < 1e-6);
            assert!(max_diff(&dx, &dx_ref) < 1e-5, "{}", max_diff(&dx, &dx_ref));
        }
    }

    #[test]
    fn erf_matches_the_integral() {
        let mut worst = 0f64;
        for i in -600..=600 {
            let x = i as f64 / 100.0;
            worst = worst.max((erf(x as f32) as f64 - erf_f64(x)).abs());
        }
        assert!(worst < 5e-7, "worst erf error {worst}");
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        for i in 0..=8700 {
            let y = -(i as f32) / 100.0;
            let rel = ((exp_nonpositive(y) as f64) - (y as f64).exp()).abs() / (y as f64).exp();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst exp relative error {worst}");
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }

    #[test]
    fn gelu_derivative_matches_finite_differences() {
        for i in -80..=80 {
            let x = i as f64 / 10.0;
            let exact = |x: f64| 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2));
            let fd = (exact(x + 1e-4) - exact(x - 1e-4)) / 2e-4;
            let got = gelu_derivative(x as f32) as f64;
            assert!((got - fd).abs() < 2e-5, "x={x}: {got} vs {fd}");
            assert!((gelu(x as f32) as f64 - exact(x)).abs() < 2e-6 * (1.0 + x.abs()));
        }
    }
}
