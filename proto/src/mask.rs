//! SimMIM's random patch-aligned mask: a fixed count of `mask_patch`-sized units is masked,
//! then the unit grid is upsampled to the model's token grid.

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{config_error, ConfigError};

/// Validated mask geometry; build once, draw many masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskGeometry {
    /// Units per side (`img / mask_patch`).
    units_per_side: usize,
    /// Tokens per unit side (`mask_patch / model_patch`).
    scale: usize,
    /// Units masked in every image: `ceil(ratio * units)`, as the official generator.
    masked_units: usize,
}

impl MaskGeometry {
    pub fn new(
        img_size: usize,
        mask_patch_size: usize,
        model_patch_size: usize,
        ratio: f64,
    ) -> Result<Self, ConfigError> {
        if mask_patch_size == 0 || model_patch_size == 0 {
            return Err(config_error("mask_patch_size", "must be at least 1"));
        }
        if !img_size.is_multiple_of(mask_patch_size) {
            return Err(config_error(
                "mask_patch_size",
                format!("{mask_patch_size} does not divide img_size {img_size}"),
            ));
        }
        if !mask_patch_size.is_multiple_of(model_patch_size) {
            return Err(config_error(
                "mask_patch_size",
                format!(
                    "{mask_patch_size} is not a multiple of the model patch size {model_patch_size}"
                ),
            ));
        }
        if ratio.is_nan() || ratio <= 0.0 || ratio > 1.0 {
            return Err(config_error(
                "mask_ratio",
                format!("{ratio} is outside (0, 1]"),
            ));
        }
        let units_per_side = img_size / mask_patch_size;
        let units = units_per_side * units_per_side;
        Ok(Self {
            units_per_side,
            scale: mask_patch_size / model_patch_size,
            masked_units: ((ratio * units as f64).ceil() as usize).min(units),
        })
    }

    /// Side of the token grid the mask is drawn on.
    pub fn token_grid(&self) -> usize {
        self.units_per_side * self.scale
    }

    pub fn masked_units(&self) -> usize {
        self.masked_units
    }

    /// A token mask (row-major, 1 = masked) drawn from `seed` alone, so any process that knows
    /// the seed draws the same mask.
    pub fn generate(&self, seed: u64) -> Vec<u8> {
        self.generate_with(&mut ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn generate_with<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> Vec<u8> {
        let side = self.units_per_side;
        let mut units = vec![0u8; side * side];
        for index in sample(rng, side * side, self.masked_units) {
            units[index] = 1;
        }
        let grid = self.token_grid();
        let mut tokens = vec![0u8; grid * grid];
        for (row, line) in tokens.chunks_exact_mut(grid).enumerate() {
            for (col, token) in line.iter_mut().enumerate() {
                *token = units[(row / self.scale) * side + col / self.scale];
            }
        }
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_exactly_ceil_ratio_units_upsampled() {
        // 192 px, mask patch 32, model patch 4: 6x6 units, each 8x8 tokens.
        let geometry = MaskGeometry::new(192, 32, 4, 0.6).expect("valid");
        assert_eq!(geometry.masked_units(), 22); // ceil(0.6 * 36)
        let mask = geometry.generate(7);
        assert_eq!(mask.len(), 48 * 48);
        assert_eq!(mask.iter().map(|&m| m as usize).sum::<usize>(), 22 * 64);
        // Every 8x8 block is uniform.
        for row in 0..48 {
            for col in 0..48 {
                assert_eq!(mask[row * 48 + col], mask[(row / 8 * 8) * 48 + col / 8 * 8]);
            }
        }
    }

    #[test]
    fn same_seed_same_mask_other_seed_other_mask() {
        let geometry = MaskGeometry::new(64, 8, 2, 0.6).expect("valid");
        assert_eq!(geometry.generate(3), geometry.generate(3));
        assert_ne!(geometry.generate(3), geometry.generate(4));
    }

    #[test]
    fn invalid_geometry_is_a_named_error() {
        let err = MaskGeometry::new(192, 40, 4, 0.6).expect_err("40 does not divide 192");
        assert!(err.to_string().contains("mask_patch_size"), "{err}");
        let err = MaskGeometry::new(192, 32, 12, 0.6).expect_err("12 does not divide 32");
        assert!(err.to_string().contains("model patch size"), "{err}");
        let err = MaskGeometry::new(192, 32, 4, 1.5).expect_err("ratio");
        assert!(err.to_string().contains("mask_ratio"), "{err}");
    }
}
