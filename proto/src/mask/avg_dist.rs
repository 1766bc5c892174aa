//! AvgDist, the SimMIM paper's measure of how hard a mask is: the mean Euclidean distance of
//! masked pixels to the nearest visible pixel. Computed with an exact distance transform
//! (Felzenszwalb and Huttenlocher's lower envelope of parabolas, one pass per axis), not a
//! window search, so large masked areas cost no more than small ones.

use super::MaskGeometry;

/// AvgDist of a `side x side` pixel mask (1 = masked), in pixels; `None` when no pixel is
/// masked or none is visible (the distance is then undefined).
pub fn avg_dist(pixels: &[u8], side: usize) -> Option<f64> {
    let masked = pixels.iter().filter(|&&p| p == 1).count();
    if masked == 0 || masked == pixels.len() {
        return None;
    }
    let squared = squared_distance_to_visible(pixels, side);
    let total: f64 = pixels
        .iter()
        .zip(&squared)
        .filter(|(&p, _)| p == 1)
        .map(|(_, &d)| d.sqrt())
        .sum();
    Some(total / masked as f64)
}

/// Squared Euclidean distance of every pixel to the nearest visible one (0 on visible pixels).
fn squared_distance_to_visible(pixels: &[u8], side: usize) -> Vec<f64> {
    // Farther than any pixel on the grid can be; finite so the envelope's arithmetic holds.
    let far = (2 * side * side) as f64 + 1.0;
    let mut grid: Vec<f64> = pixels
        .iter()
        .map(|&p| if p == 1 { far } else { 0.0 })
        .collect();
    let mut line = vec![0.0; side];
    let mut out = vec![0.0; side];
    let mut scratch = Envelope::new(side);
    for col in 0..side {
        for row in 0..side {
            line[row] = grid[row * side + col];
        }
        scratch.transform(&line, &mut out);
        for row in 0..side {
            grid[row * side + col] = out[row];
        }
    }
    for row in grid.chunks_exact_mut(side) {
        line.copy_from_slice(row);
        scratch.transform(&line, &mut out);
        row.copy_from_slice(&out);
    }
    grid
}

/// The 1-D squared distance transform `d(q) = min_p (q - p)^2 + f(p)`, with its buffers.
struct Envelope {
    /// Positions of the parabolas in the lower envelope.
    vertex: Vec<usize>,
    /// Where each envelope parabola starts to be the lowest.
    bound: Vec<f64>,
}

impl Envelope {
    fn new(n: usize) -> Self {
        Self {
            vertex: vec![0; n],
            bound: vec![0.0; n + 1],
        }
    }

    fn transform(&mut self, f: &[f64], d: &mut [f64]) {
        let n = f.len();
        let (v, z) = (&mut self.vertex, &mut self.bound);
        let mut k = 0;
        v[0] = 0;
        z[0] = f64::NEG_INFINITY;
        z[1] = f64::INFINITY;
        for q in 1..n {
            let intersect = |p: usize| {
                ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64))
            };
            let mut s = intersect(v[k]);
            while s <= z[k] {
                k -= 1;
                s = intersect(v[k]);
            }
            k += 1;
            v[k] = q;
            z[k] = s;
            z[k + 1] = f64::INFINITY;
        }
        k = 0;
        for (q, out) in d.iter_mut().enumerate() {
            while z[k + 1] < q as f64 {
                k += 1;
            }
            let dq = q as f64 - v[k] as f64;
            *out = dq * dq + f[v[k]];
        }
    }
}

/// What a strategy's masks are like over many draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskStats {
    /// Mean AvgDist in pixels (masks with no visible pixel left out).
    pub avg_dist: f64,
    /// Mean share of masked pixels (what the strategy achieved, not what was asked).
    pub ratio: f64,
    pub samples: usize,
}

impl MaskStats {
    /// Statistics over the masks drawn from seeds `0..samples` mixed with `seed`.
    pub fn measure(geometry: &MaskGeometry, seed: u64, samples: usize) -> Self {
        let side = geometry.units_per_side() * geometry.mask_patch();
        let (mut dist, mut defined, mut ratio) = (0.0, 0usize, 0.0);
        for sample in 0..samples as u64 {
            let units = geometry.units(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sample);
            ratio += units.iter().map(|&u| f64::from(u)).sum::<f64>() / units.len() as f64;
            if let Some(d) = avg_dist(&geometry.pixels_from_units(&units), side) {
                dist += d;
                defined += 1;
            }
        }
        Self {
            avg_dist: if defined == 0 {
                f64::NAN
            } else {
                dist / defined as f64
            },
            ratio: ratio / samples.max(1) as f64,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskStrategy;

    /// The distance by brute force over every visible pixel.
    fn brute(pixels: &[u8], side: usize) -> Option<f64> {
        let visible: Vec<(f64, f64)> = (0..pixels.len())
            .filter(|&i| pixels[i] == 0)
            .map(|i| ((i / side) as f64, (i % side) as f64))
            .collect();
        let masked: Vec<usize> = (0..pixels.len()).filter(|&i| pixels[i] == 1).collect();
        if visible.is_empty() || masked.is_empty() {
            return None;
        }
        let total: f64 = masked
            .iter()
            .map(|&i| {
                let (r, c) = ((i / side) as f64, (i % side) as f64);
                visible
                    .iter()
                    .map(|&(vr, vc)| ((r - vr).powi(2) + (c - vc).powi(2)).sqrt())
                    .fold(f64::INFINITY, f64::min)
            })
            .sum();
        Some(total / masked.len() as f64)
    }

    #[test]
    fn the_transform_is_exact() {
        for (strategy, patch, ratio, seed) in [
            (MaskStrategy::Random, 4, 0.6, 1),
            (MaskStrategy::Square, 4, 0.8, 2),
            (MaskStrategy::Block, 2, 0.5, 3),
            (MaskStrategy::Random, 8, 0.9, 4),
        ] {
            let geometry = MaskGeometry::with_strategy(32, patch, 1, ratio, strategy).expect("ok");
            let pixels = geometry.pixels_from_units(&geometry.units(seed));
            let fast = avg_dist(&pixels, 32).expect("defined");
            let slow = brute(&pixels, 32).expect("defined");
            assert!((fast - slow).abs() < 1e-9, "{strategy:?}: {fast} vs {slow}");
        }
    }

    #[test]
    fn known_values() {
        // One masked pixel next to visible ones: 1. A masked 3x3 square in a 5x5 image: the
        // eight border pixels are at 1, the centre at 2.
        let mut one = vec![0u8; 9];
        one[4] = 1;
        assert_eq!(avg_dist(&one, 3), Some(1.0));
        let mut square = vec![0u8; 25];
        for r in 1..4 {
            for c in 1..4 {
                square[r * 5 + c] = 1;
            }
        }
        assert_eq!(avg_dist(&square, 5), Some(10.0 / 9.0));
        assert_eq!(avg_dist(&[1, 1, 1, 1], 2), None, "nothing visible");
        assert_eq!(avg_dist(&[0, 0, 0, 0], 2), None, "nothing masked");
    }

    #[test]
    fn the_papers_two_trends() {
        // SimMIM's figure: AvgDist rises with the ratio, and with the mask patch at one ratio.
        let stats = |patch, ratio| {
            let g = MaskGeometry::new(192, patch, 4, ratio).expect("geometry");
            MaskStats::measure(&g, 0, 16).avg_dist
        };
        let by_ratio: Vec<f64> = [0.1, 0.3, 0.5, 0.7, 0.9].map(|r| stats(32, r)).to_vec();
        assert!(by_ratio.windows(2).all(|w| w[0] < w[1]), "{by_ratio:?}");
        let by_patch: Vec<f64> = [4, 8, 16, 32, 64].map(|p| stats(p, 0.6)).to_vec();
        assert!(by_patch.windows(2).all(|w| w[0] < w[1]), "{by_patch:?}");
    }
}
