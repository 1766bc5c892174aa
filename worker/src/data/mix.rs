//! Mixup and CutMix over a batch, as timm's `Mixup` in batch mode: each image is mixed with
//! the image at the mirrored position of the batch, with one mixing ratio per batch drawn
//! from Beta(alpha, alpha); the soft targets are mixed by the same (area-corrected) ratio.

use rand::Rng;
use rand_distr::{Beta, Distribution};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixSpec {
    pub mixup: f64,
    pub cutmix: f64,
    /// Chance that a batch is mixed at all.
    pub prob: f64,
    /// Chance of CutMix when both are on.
    pub switch_prob: f64,
}

impl MixSpec {
    pub fn enabled(&self) -> bool {
        self.mixup > 0.0 || self.cutmix > 0.0
    }
}

/// Mixes `pixels` (`[B, 3, side, side]`) and `targets` (`[B, classes]`) in place; returns the
/// ratio of each image's own content that remains (1.0 when the batch was left alone).
pub fn mix_batch(
    pixels: &mut [f32],
    targets: &mut [f32],
    side: usize,
    spec: &MixSpec,
    rng: &mut impl Rng,
) -> f64 {
    let images = pixels.len() / (3 * side * side);
    if images < 2 || !spec.enabled() || !rng.random_bool(spec.prob.clamp(0.0, 1.0)) {
        return 1.0;
    }
    let classes = targets.len() / images;
    let cutmix = spec.cutmix > 0.0
        && (spec.mixup <= 0.0 || rng.random_bool(spec.switch_prob.clamp(0.0, 1.0)));
    let alpha = if cutmix { spec.cutmix } else { spec.mixup };
    let lam = match Beta::new(alpha, alpha) {
        Ok(beta) => beta.sample(rng),
        Err(_) => return 1.0,
    };
    let source = pixels.to_vec();
    let plane = side * side;
    let lam = if cutmix {
        // A box of area (1 - lam) centred uniformly, clipped to the image.
        let cut = ((1.0 - lam).sqrt() * side as f64) as usize;
        let (cy, cx) = (rng.random_range(0..side), rng.random_range(0..side));
        let (y0, y1) = (cy.saturating_sub(cut / 2), (cy + cut / 2).min(side));
        let (x0, x1) = (cx.saturating_sub(cut / 2), (cx + cut / 2).min(side));
        for image in 0..images {
            let other = images - 1 - image;
            for c in 0..3 {
                for y in y0..y1 {
                    let row = y * side;
                    let dst = (image * 3 + c) * plane + row;
                    let src = (other * 3 + c) * plane + row;
                    pixels[dst + x0..dst + x1].copy_from_slice(&source[src + x0..src + x1]);
                }
            }
        }
        1.0 - ((y1 - y0) * (x1 - x0)) as f64 / plane as f64
    } else {
        let (a, b) = (lam as f32, (1.0 - lam) as f32);
        let per_image = 3 * plane;
        for image in 0..images {
            let other = images - 1 - image;
            for i in 0..per_image {
                pixels[image * per_image + i] =
                    a * source[image * per_image + i] + b * source[other * per_image + i];
            }
        }
        lam
    };
    let original = targets.to_vec();
    let (a, b) = (lam as f32, (1.0 - lam) as f32);
    for image in 0..images {
        let other = images - 1 - image;
        for c in 0..classes {
            targets[image * classes + c] =
                a * original[image * classes + c] + b * original[other * classes + c];
        }
    }
    lam
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mixing_keeps_targets_normalised_and_matches_the_pixels() {
        let side = 8;
        let images = 4;
        // Image i is filled with the value i; one-hot targets of class i.
        let mut pixels: Vec<f32> = (0..images)
            .flat_map(|i| std::iter::repeat_n(i as f32, 3 * side * side))
            .collect();
        let mut targets = vec![0f32; images * images];
        for i in 0..images {
            targets[i * images + i] = 1.0;
        }
        for (mixup, cutmix) in [(0.8, 0.0), (0.0, 1.0)] {
            let spec = MixSpec {
                mixup,
                cutmix,
                prob: 1.0,
                switch_prob: 0.5,
            };
            let (mut p, mut t) = (pixels.clone(), targets.clone());
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let lam = mix_batch(&mut p, &mut t, side, &spec, &mut rng);
            assert!((0.0..=1.0).contains(&lam));
            for i in 0..images {
                let row = &t[i * images..(i + 1) * images];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                // The mean pixel of image i is its target-weighted mix of the two values.
                let mean: f32 = p[i * 3 * side * side..(i + 1) * 3 * side * side]
                    .iter()
                    .sum::<f32>()
                    / (3 * side * side) as f32;
                let expected: f32 = row.iter().enumerate().map(|(c, w)| c as f32 * w).sum();
                assert!(
                    (mean - expected).abs() < 1e-4,
                    "{mixup}/{cutmix}: {mean} vs {expected}"
                );
            }
        }
        let off = MixSpec {
            mixup: 0.0,
            cutmix: 0.0,
            prob: 1.0,
            switch_prob: 0.5,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert_eq!(
            mix_batch(&mut pixels, &mut targets, side, &off, &mut rng),
            1.0
        );
    }
}
