//! SimMIM's patch-aligned masks: a grid of `mask_patch`-sized units is masked by one of the
//! paper's strategies, then upsampled to the model's token grid.
//!
//! - `random` (SimMIM's default): a fixed count of units, drawn uniformly without replacement.
//! - `square`: one square of units, placed uniformly (the paper's "square" strategy).
//! - `block`: BEiT's block-wise generator, rectangles of at least 16 units until the count.
//!
//! Every mask is drawn from a seed alone, so any process that knows the seed draws the same one.

mod avg_dist;
mod strategy;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use avg_dist::{avg_dist, MaskStats};
pub use strategy::MaskStrategy;

use crate::error::{config_error, ConfigError};

/// Validated mask geometry; build once, draw many masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskGeometry {
    /// Units per side (`img / mask_patch`).
    units_per_side: usize,
    /// Tokens per unit side (`mask_patch / model_patch`).
    scale: usize,
    /// Pixels per unit side.
    mask_patch: usize,
    /// Units the strategy aims to mask: `ceil(ratio * units)`, as the official generator.
    masked_units: usize,
    strategy: MaskStrategy,
}

/// `model.config.mask`: the strategy, and the mask patch and ratio where they are given here
/// rather than as `mask_patch_size` / `mask_ratio` (set here, they win).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSpec {
    #[serde(default)]
    pub strategy: MaskStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl MaskSpec {
    /// Whether the spec says nothing beyond the defaults (then it is left out of a written
    /// config, so configs and their hashes from before it existed stay the same).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl MaskGeometry {
    /// The `random` strategy's geometry (see [`Self::with_strategy`]).
    pub fn new(
        img_size: usize,
        mask_patch_size: usize,
        model_patch_size: usize,
        ratio: f64,
    ) -> Result<Self, ConfigError> {
        Self::with_strategy(
            img_size,
            mask_patch_size,
            model_patch_size,
            ratio,
            MaskStrategy::Random,
        )
    }

    pub fn with_strategy(
        img_size: usize,
        mask_patch_size: usize,
        model_patch_size: usize,
        ratio: f64,
        strategy: MaskStrategy,
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
        strategy.validate(units_per_side)?;
        Ok(Self {
            units_per_side,
            scale: mask_patch_size / model_patch_size,
            mask_patch: mask_patch_size,
            masked_units: ((ratio * units as f64).ceil() as usize).min(units),
            strategy,
        })
    }

    /// Side of the token grid the mask is drawn on.
    pub fn token_grid(&self) -> usize {
        self.units_per_side * self.scale
    }

    /// Side of the unit grid the strategy masks.
    pub fn units_per_side(&self) -> usize {
        self.units_per_side
    }

    /// Pixels per unit side.
    pub fn mask_patch(&self) -> usize {
        self.mask_patch
    }

    /// Units the strategy aims to mask (`square` and `block` may mask a few more or fewer:
    /// [`MaskStats`] reports the true ratio).
    pub fn masked_units(&self) -> usize {
        self.masked_units
    }

    pub fn strategy(&self) -> MaskStrategy {
        self.strategy
    }

    /// A token mask (row-major, 1 = masked) drawn from `seed` alone.
    pub fn generate(&self, seed: u64) -> Vec<u8> {
        self.generate_with(&mut ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn generate_with<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> Vec<u8> {
        self.tokens_from_units(&self.units_with(rng))
    }

    /// The unit mask (row-major over the unit grid, 1 = masked) drawn from `seed`.
    pub fn units(&self, seed: u64) -> Vec<u8> {
        self.units_with(&mut ChaCha8Rng::seed_from_u64(seed))
    }

    fn units_with<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> Vec<u8> {
        self.strategy
            .draw(rng, self.units_per_side, self.masked_units)
    }

    /// A unit mask upsampled to the token grid.
    pub fn tokens_from_units(&self, units: &[u8]) -> Vec<u8> {
        upsample(units, self.units_per_side, self.scale)
    }

    /// A unit mask upsampled to pixels (`img_size` per side).
    pub fn pixels_from_units(&self, units: &[u8]) -> Vec<u8> {
        upsample(units, self.units_per_side, self.mask_patch)
    }
}

/// Masked cells (1s) in the `(h, w)` rectangle at `(top, left)` of a row-major grid `side`
/// cells wide: what a block brings that is new, or how much of a unit a drawn mask covers.
pub fn masked_in(
    cells: &[u8],
    side: usize,
    (top, left): (usize, usize),
    (h, w): (usize, usize),
) -> usize {
    (top..top + h)
        .map(|r| {
            cells[r * side + left..r * side + left + w]
                .iter()
                .map(|&c| usize::from(c))
                .sum::<usize>()
        })
        .sum()
}

/// Each cell of a `side x side` grid repeated as a `factor x factor` block.
fn upsample(cells: &[u8], side: usize, factor: usize) -> Vec<u8> {
    let grid = side * factor;
    let mut out = vec![0u8; grid * grid];
    for (row, line) in out.chunks_exact_mut(grid).enumerate() {
        for (col, value) in line.iter_mut().enumerate() {
            *value = cells[(row / factor) * side + col / factor];
        }
    }
    out
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
    fn random_masks_keep_their_bits() {
        // The random strategy's draw as it was before strategies existed (rand's index
        // sample over ChaCha8 from the seed): a resumed run must see the same masks.
        let geometry = MaskGeometry::new(64, 16, 4, 0.5).expect("valid");
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut units = vec![0u8; 16];
        for index in rand::seq::index::sample(&mut rng, 16, 8) {
            units[index] = 1;
        }
        assert_eq!(geometry.units(11), units);
    }

    #[test]
    fn same_seed_same_mask_other_seed_other_mask() {
        for strategy in [
            MaskStrategy::Random,
            MaskStrategy::Square,
            MaskStrategy::Block,
        ] {
            let geometry = MaskGeometry::with_strategy(64, 8, 2, 0.6, strategy).expect("valid");
            assert_eq!(geometry.generate(3), geometry.generate(3), "{strategy:?}");
            assert_ne!(geometry.generate(3), geometry.generate(4), "{strategy:?}");
        }
    }

    #[test]
    fn invalid_geometry_is_a_named_error() {
        let err = MaskGeometry::new(192, 40, 4, 0.6).expect_err("40 does not divide 192");
        assert!(err.to_string().contains("mask_patch_size"), "{err}");
        let err = MaskGeometry::new(192, 32, 12, 0.6).expect_err("12 does not divide 32");
        assert!(err.to_string().contains("model patch size"), "{err}");
        let err = MaskGeometry::new(192, 32, 4, 1.5).expect_err("ratio");
        assert!(err.to_string().contains("mask_ratio"), "{err}");
        let err = MaskGeometry::with_strategy(128, 32, 4, 0.6, MaskStrategy::Block)
            .expect_err("4x4 units hold no block of 16 that fits");
        assert!(err.to_string().contains("mask.strategy"), "{err}");
    }

    #[test]
    fn the_spec_parses_and_names_an_unknown_strategy() {
        let spec: MaskSpec = serde_yaml::from_str("strategy: block\npatch: 16").expect("spec");
        assert_eq!(spec.strategy, MaskStrategy::Block);
        assert_eq!(spec.patch, Some(16));
        assert!(MaskSpec::default().is_default());
        let err = serde_yaml::from_str::<MaskSpec>("strategy: blocky").expect_err("unknown");
        assert!(err.to_string().contains("blocky"), "{err}");
    }
}
