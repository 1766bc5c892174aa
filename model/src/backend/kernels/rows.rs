//! Splitting a kernel's rows across the machine's cores.

use rayon::prelude::*;

/// The machine's cores. Kernels split their work (and their partial sums) by this, not by
/// `rayon::current_num_threads()`: a sub-batch runs inside a pool with a share of the cores
/// (`step::part_pools`), and a result must not depend on which pool computed it.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work(first_element, block)` over blocks of whole rows of `out` on all cores.
pub(crate) fn for_row_blocks(
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

/// Applies `op(x[i], g[i])` over chunks on all cores (`g` is 0 when absent).
pub(crate) fn map_parallel(
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
