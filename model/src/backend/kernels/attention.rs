//! The CPU kernel behind [`crate::encoders::attention`] on burn-flex: per group and head, strided
//! small matmuls (the `gemm` crate burn-flex itself uses) that read q, k and v where the
//! fused projection wrote them and write the output with its heads already merged; bias add
//! and softmax run on the `N x N` logits while they are in cache. Groups are spread over
//! rayon's threads.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::math::exp_nonpositive;

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Windows (Swin) or images (ViT).
    pub groups: usize,
    pub tokens: usize,
    /// Channels of q (and of k, v and the output).
    pub dim: usize,
    pub heads: usize,
    /// Distinct biases: group `g` uses bias `g % bias_groups`.
    pub bias_groups: usize,
}

impl Shape {
    /// The shape of a call on a qkv projection of dimensions `[G, N, 3C]`, when those and
    /// the slices' lengths (`None`: not given) describe a call the kernel can run.
    pub fn of(
        qkv_dims: &[usize],
        heads: usize,
        bias_groups: usize,
        lengths: Lengths,
    ) -> Option<Self> {
        let &[groups, tokens, width] = qkv_dims else {
            return None;
        };
        let shape = Self {
            groups,
            tokens,
            dim: width / 3,
            heads,
            bias_groups,
        };
        let fits = |len: Option<usize>, expected: usize| len.is_none_or(|len| len == expected);
        let valid = heads > 0
            && shape.dim.is_multiple_of(heads)
            && bias_groups > 0
            && groups.is_multiple_of(bias_groups)
            && lengths.qkv == groups * shape.qkv_group()
            && fits(lengths.bias, bias_groups * shape.probs_group())
            && fits(lengths.probs, groups * shape.probs_group())
            && fits(lengths.out, groups * tokens * shape.dim);
        valid.then_some(shape)
    }

    fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Values of one group's qkv rows.
    fn qkv_group(&self) -> usize {
        self.tokens * 3 * self.dim
    }

    /// Values of one group's probabilities (all heads).
    fn probs_group(&self) -> usize {
        self.heads * self.tokens * self.tokens
    }
}

/// The lengths of the slices handed to the kernel; `None` for those a call does not take.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lengths {
    pub qkv: usize,
    pub bias: Option<usize>,
    pub probs: Option<usize>,
    /// The output, or the output's gradient.
    pub out: Option<usize>,
}

/// A row-major `rows x cols` view of f32s with arbitrary strides, for `gemm`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl View {
    fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `row_stride`.
    fn transposed(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: row_stride as isize,
        }
    }
}

/// `dst[m x n] (row stride dst_stride) = alpha * lhs[m x k] rhs[k x n]`, single-threaded.
///
/// # Safety
/// Every view must address valid f32s for the given sizes, and `dst` must not overlap them.
unsafe fn matmul_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_stride: usize,
    lhs: View,
    rhs: View,
    alpha: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_stride as isize,
        false,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        0.0,
        alpha,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Softmax of `row + bias` in place (`row` holds the scaled logits).
fn softmax_with_bias(row: &mut [f32], bias: &[f32]) {
    let mut max = f32::NEG_INFINITY;
    for (x, b) in row.iter_mut().zip(bias) {
        *x += b;
        max = max.max(*x);
    }
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Forward: `(output [G, N, C], probabilities [G, heads, N, N])`.
pub fn forward(qkv: &[f32], bias: &[f32], shape: Shape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let Shape {
        groups,
        tokens: n,
        dim: c,
        heads,
        bias_groups,
    } = shape;
    let hd = shape.head_dim();
    let mut out = vec![0f32; groups * n * c];
    let mut probs = vec![0f32; groups * shape.probs_group()];
    out.par_chunks_mut(n * c)
        .zip(probs.par_chunks_mut(shape.probs_group()))
        .enumerate()
        .with_min_len(4)
        .for_each(|(g, (out, probs))| {
            let rows = &qkv[g * shape.qkv_group()..][..shape.qkv_group()];
            let bias = &bias[(g % bias_groups) * shape.probs_group()..][..shape.probs_group()];
            for h in 0..heads {
                let p = &mut probs[h * n * n..][..n * n];
                let q = View::rows(rows[h * hd..].as_ptr(), 3 * c);
                let k_t = View::transposed(rows[c + h * hd..].as_ptr(), 3 * c);
                let v = View::rows(rows[2 * c + h * hd..].as_ptr(), 3 * c);
                // SAFETY: q, k and v address `n` rows of `hd` values inside `rows`
                // (offsets below 3c, row stride 3c); `p` is an owned n x n block and the
                // output block is `n` rows of `hd` inside `out`, disjoint from the inputs.
                unsafe { matmul_into((n, n, hd), p.as_mut_ptr(), n, q, k_t, scale) };
                for (row, b) in p
                    .chunks_exact_mut(n)
                    .zip(bias[h * n * n..][..n * n].chunks_exact(n))
                {
                    softmax_with_bias(row, b);
                }
                let probs_view = View::rows(p.as_ptr(), n);
                let dst = out[h * hd..].as_mut_ptr();
                // SAFETY: as above.
                unsafe { matmul_into((n, hd, n), dst, c, probs_view, v, 1.0) };
            }
        });
    (out, probs)
}

/// Backward from the forward's probabilities and the output gradient `[G, N, C]`:
/// `(d_qkv [G, N, 3C], d_bias [P, heads, N, N])`.
pub fn backward(
    qkv: &[f32],
    probs: &[f32],
    grad: &[f32],
    shape: Shape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Shape {
        groups,
        tokens: n,
        dim: c,
        heads,
        bias_groups,
    } = shape;
    let hd = shape.head_dim();
    let bias_len = bias_groups * shape.probs_group();
    let mut d_qkv = vec![0f32; groups * shape.qkv_group()];
    // Each task sums its own bias gradient; a few tasks per core keep the partials few (split
    // by the machine's cores: see `kernels::rows::cores`).
    let tasks = super::rows::cores() * 2;
    let groups_per_task = groups.div_ceil(tasks).max(1);
    let partials: Vec<Vec<f32>> = d_qkv
        .par_chunks_mut(groups_per_task * shape.qkv_group())
        .enumerate()
        .map(|(task, d_qkv)| {
            let mut d_bias = vec![0f32; bias_len];
            let mut d_logits = vec![0f32; n * n];
            for (i, d_rows) in d_qkv.chunks_exact_mut(shape.qkv_group()).enumerate() {
                let g = task * groups_per_task + i;
                let rows = &qkv[g * shape.qkv_group()..][..shape.qkv_group()];
                let d_out = &grad[g * n * c..][..n * c];
                let probs = &probs[g * shape.probs_group()..][..shape.probs_group()];
                let d_bias =
                    &mut d_bias[(g % bias_groups) * shape.probs_group()..][..shape.probs_group()];
                for h in 0..heads {
                    let p = &probs[h * n * n..][..n * n];
                    let d_o = View::rows(d_out[h * hd..].as_ptr(), c);
                    let v_t = View::transposed(rows[2 * c + h * hd..].as_ptr(), 3 * c);
                    // SAFETY (all four products): the inputs address `n` rows of `hd`
                    // values inside `rows`/`d_out` or the n x n blocks `p`/`d_logits`; each
                    // destination is `d_logits` or `n` rows of `hd` inside `d_rows`, which
                    // no input aliases.
                    unsafe { matmul_into((n, n, hd), d_logits.as_mut_ptr(), n, d_o, v_t, 1.0) };
                    for ((dl, p), db) in d_logits
                        .chunks_exact_mut(n)
                        .zip(p.chunks_exact(n))
                        .zip(d_bias[h * n * n..][..n * n].chunks_exact_mut(n))
                    {
                        let dot: f32 = dl.iter().zip(p).map(|(a, b)| a * b).sum();
                        for ((d, &y), b) in dl.iter_mut().zip(p).zip(db.iter_mut()) {
                            *d = y * (*d - dot);
                            *b += *d;
                        }
                    }
                    let p_t = View::transposed(p.as_ptr(), n);
                    let dst = d_rows[2 * c + h * hd..].as_mut_ptr();
                    unsafe { matmul_into((n, hd, n), dst, 3 * c, p_t, d_o, 1.0) };
                    let k = View::rows(rows[c + h * hd..].as_ptr(), 3 * c);
                    let dl = View::rows(d_logits.as_ptr(), n);
                    let dst = d_rows[h * hd..].as_mut_ptr();
                    unsafe { matmul_into((n, hd, n), dst, 3 * c, dl, k, scale) };
                    let q = View::rows(rows[h * hd..].as_ptr(), 3 * c);
                    let dl_t = View::transposed(d_logits.as_ptr(), n);
                    let dst = d_rows[c + h * hd..].as_mut_ptr();
                    unsafe { matmul_into((n, hd, n), dst, 3 * c, dl_t, q, scale) };
                }
            }
            d_bias
        })
        .collect();
    let mut d_bias = vec![0f32; bias_len];
    for partial in partials {
        for (total, part) in d_bias.iter_mut().zip(partial) {
            *total += part;
        }
    }
    (d_qkv, d_bias)
}
