//! LayerNorm's backward in one pass per row.

use rayon::prelude::*;

use super::rows::cores;

/// LayerNorm backward over rows of `gamma.len()`: `(dx, dgamma, dbeta)`. Mean and inverse
/// deviation are recomputed per row (cheaper than storing them); rows are split across
/// threads, each with its own `dgamma`/`dbeta` partial sums.
pub(crate) fn backward_rows(
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
            backward_block(x, gamma, grad, epsilon, dx)
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

fn backward_block(
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
