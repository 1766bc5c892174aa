//! Index and mask buffers the official code registers. They are pure functions of the
//! geometry, so they are recomputed here, never loaded (and checked against a checkpoint's).

/// Swin's `relative_position_index` for a `window x window` window, flattened row-major
/// (`[N*N]`, N = window^2), into a table of `(2*window-1)^2` rows.
pub fn swin_relative_position_index(window: usize) -> Vec<i64> {
    relative_index(window, window)
}

/// BEiT/SimMIM ViT `relative_position_index` for a token grid with a cls token: `[(N+1)^2]`
/// into a table of `(2h-1)(2w-1) + 3` rows (the last three are cls-to-token, token-to-cls and
/// cls-to-cls).
pub fn vit_relative_position_index(grid: usize) -> Vec<i64> {
    let n = grid * grid;
    let table = vit_table_rows(grid) as i64;
    let inner = relative_index(grid, grid);
    let mut index = vec![0i64; (n + 1) * (n + 1)];
    for i in 0..n {
        for j in 0..n {
            index[(i + 1) * (n + 1) + j + 1] = inner[i * n + j];
        }
    }
    index[..=n].fill(table - 3);
    for i in 0..=n {
        index[i * (n + 1)] = table - 2;
    }
    index[0] = table - 1;
    index
}

/// SwinV2's `relative_coords_table` (`[(2W-1)^2, 2]`, row-major over (dh, dw) in
/// `-(W-1)..W`): each offset divided by `normaliser - 1` (the pretrained window, or this
/// window when that is 0), times 8, then `sign(x) * log2(|x| + 1) / log2(8)`. Computed in f32
/// step by step as the official module does in torch.
pub fn swinv2_coords_table(window: usize, pretrained_window: usize) -> Vec<f32> {
    let normaliser = if pretrained_window > 0 {
        pretrained_window
    } else {
        window
    };
    let span = (normaliser as f32) - 1.0;
    let log_spaced = |offset: i64| -> f32 {
        let x = (offset as f32) / span * 8.0;
        x.signum() * (x.abs() + 1.0).log2() / 3.0
    };
    let w = window as i64;
    let mut table = Vec::with_capacity(swin_table_rows(window) * 2);
    for dh in -(w - 1)..w {
        for dw in -(w - 1)..w {
            table.push(log_spaced(dh));
            table.push(log_spaced(dw));
        }
    }
    table
}

pub fn swin_table_rows(window: usize) -> usize {
    (2 * window - 1) * (2 * window - 1)
}

pub fn vit_table_rows(grid: usize) -> usize {
    (2 * grid - 1) * (2 * grid - 1) + 3
}

fn relative_index(height: usize, width: usize) -> Vec<i64> {
    let n = height * width;
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        let (hi, wi) = ((i / width) as i64, (i % width) as i64);
        for j in 0..n {
            let (hj, wj) = ((j / width) as i64, (j % width) as i64);
            let dh = hi - hj + height as i64 - 1;
            let dw = wi - wj + width as i64 - 1;
            index.push(dh * (2 * width as i64 - 1) + dw);
        }
    }
    index
}

/// The shifted-window attention mask (`attn_mask`, `[nW, N, N]`, 0 or -100) of a
/// `resolution x resolution` stage, exactly as the official code builds it.
pub fn swin_shift_mask(resolution: usize, window: usize, shift: usize) -> Vec<f32> {
    let region = |x: usize| -> usize {
        if x < resolution - window {
            0
        } else if x < resolution - shift {
            1
        } else {
            2
        }
    };
    let per_side = resolution / window;
    let n = window * window;
    let mut mask = Vec::with_capacity(per_side * per_side * n * n);
    for wh in 0..per_side {
        for ww in 0..per_side {
            let labels: Vec<usize> = (0..n)
                .map(|t| {
                    let (h, w) = (wh * window + t / window, ww * window + t % window);
                    region(h) * 3 + region(w)
                })
                .collect();
            for i in 0..n {
                for j in 0..n {
                    mask.push(if labels[i] == labels[j] { 0.0 } else { -100.0 });
                }
            }
        }
    }
    mask
}

/// A Swin relative-position-bias table (`[(2w-1)^2, heads]`, row-major) resized to
/// `rows_out` rows, as the official fine-tuning does when the window changes (e.g. 6 at
/// pretraining, 7 at fine-tuning): the table viewed as `heads` square images, resized by
/// `F.interpolate(mode="bicubic", align_corners=False)`.
pub fn resize_swin_table(values: &[f32], heads: usize, rows_out: usize) -> Vec<f32> {
    let rows_in = values.len() / heads.max(1);
    let side_in = (rows_in as f64).sqrt().round() as usize;
    let side_out = (rows_out as f64).sqrt().round() as usize;
    let mut out = vec![0f32; side_out * side_out * heads];
    for head in 0..heads {
        let plane: Vec<f32> = (0..rows_in).map(|r| values[r * heads + head]).collect();
        let resized = bicubic(&plane, side_in, side_out);
        for (r, v) in resized.into_iter().enumerate() {
            out[r * heads + head] = v;
        }
    }
    out
}

/// PyTorch's `upsample_bicubic2d` (align_corners=False, A = -0.75, borders clamped) for one
/// square plane.
fn bicubic(plane: &[f32], side_in: usize, side_out: usize) -> Vec<f32> {
    if side_in == side_out {
        return plane.to_vec();
    }
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = side_in as f64 / side_out as f64;
    // For each output coordinate: the four source indices (clamped) and their weights.
    let taps: Vec<([usize; 4], [f64; 4])> = (0..side_out)
        .map(|dst| {
            let real = scale * (dst as f64 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            let index = |offset: i64| (base as i64 + offset).clamp(0, side_in as i64 - 1) as usize;
            ([index(-1), index(0), index(1), index(2)], weights)
        })
        .collect();
    let mut out = Vec::with_capacity(side_out * side_out);
    for (rows, row_weights) in &taps {
        for (cols, col_weights) in &taps {
            let mut value = 0.0f64;
            for (r, wr) in rows.iter().zip(row_weights) {
                let mut line = 0.0f64;
                for (c, wc) in cols.iter().zip(col_weights) {
                    line += f64::from(plane[r * side_in + c]) * wc;
                }
                value += line * wr;
            }
            out.push(value as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swin_index_matches_the_official_formula_corners() {
        let w = 2;
        let index = swin_relative_position_index(w);
        // Same token: offset (0,0) -> (w-1)*(2w-1) + (w-1) = 4.
        assert_eq!(index[0], 4);
        // token 0 (0,0) vs token 3 (1,1): (-1,-1) -> 0.
        assert_eq!(index[3], 0);
        // token 3 vs token 0: (1,1) -> 2*3+2 = 8.
        assert_eq!(index[3 * 4], 8);
        assert!(index.iter().all(|&i| (i as usize) < swin_table_rows(w)));
    }

    #[test]
    fn vit_index_has_cls_rows() {
        let index = vit_relative_position_index(2);
        let rows = vit_table_rows(2) as i64;
        assert_eq!(index[0], rows - 1);
        assert_eq!(index[1], rows - 3);
        assert_eq!(index[5], rows - 2);
        assert_eq!(index[6], 4);
    }

    #[test]
    fn shift_mask_blocks_regions() {
        let mask = swin_shift_mask(8, 4, 2);
        assert_eq!(mask.len(), 4 * 16 * 16);
        // First window never crosses a region boundary.
        assert!(mask[..256].iter().all(|&v| v == 0.0));
        // Last window mixes four regions: some pairs masked.
        assert!(mask[3 * 256..].iter().any(|&v| v == -100.0));
    }
}
