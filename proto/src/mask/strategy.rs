//! The three ways the paper masks the unit grid.

use rand::seq::index::sample;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{config_error, ConfigError};

/// `model.config.mask.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskStrategy {
    /// A fixed count of units drawn uniformly without replacement (SimMIM's own).
    #[default]
    Random,
    /// One axis-aligned square of units holding the ratio, placed uniformly.
    Square,
    /// BEiT's block-wise masking: random rectangles of at least [`BLOCK_MIN_UNITS`] units, aspect
    /// ratio in [0.3, 1/0.3], until the count is reached.
    Block,
}

/// BEiT's `min_num_patches`.
pub const BLOCK_MIN_UNITS: usize = 16;
/// BEiT's `min_aspect` (the maximum is its inverse).
const BLOCK_MIN_ASPECT: f64 = 0.3;
/// Tries per rectangle before BEiT's generator gives up on adding one.
const BLOCK_TRIES: usize = 10;

impl MaskStrategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Square => "square",
            Self::Block => "block",
        }
    }

    /// Whether the strategy can mask a grid of `side x side` units.
    pub(super) fn validate(self, side: usize) -> Result<(), ConfigError> {
        // A block must be narrower and shorter than the grid (as BEiT's) and hold at least
        // 16 units: 4x4 inside a grid of 5x5 units is the smallest.
        if self == Self::Block && side < 5 {
            return Err(config_error(
                "mask.strategy",
                format!(
                    "block masking needs a grid of at least 5x5 mask units (img_size / mask \
                     patch); this one is {side}x{side}: use a smaller mask patch or another strategy"
                ),
            ));
        }
        Ok(())
    }

    /// A unit mask over `side x side` units with about `count` masked.
    pub(super) fn draw<R: Rng + ?Sized>(self, rng: &mut R, side: usize, count: usize) -> Vec<u8> {
        let mut units = vec![0u8; side * side];
        match self {
            Self::Random => {
                for index in sample(rng, side * side, count) {
                    units[index] = 1;
                }
            }
            Self::Square => {
                let edge = square_edge(count, side);
                let top = rng.random_range(0..=side - edge);
                let left = rng.random_range(0..=side - edge);
                fill(&mut units, side, (top, left), (edge, edge));
            }
            Self::Block => block(rng, &mut units, side, count),
        }
        units
    }
}

/// The square's side whose area is nearest to `count` units (at least 1, at most the grid).
pub fn square_edge(count: usize, side: usize) -> usize {
    ((count as f64).sqrt().round() as usize).clamp(1, side)
}

/// Sets a `(h, w)` rectangle at `(top, left)`; returns how many units were newly masked.
fn fill(
    units: &mut [u8],
    side: usize,
    (top, left): (usize, usize),
    (h, w): (usize, usize),
) -> usize {
    let mut added = 0;
    for row in top..top + h {
        for unit in &mut units[row * side + left..row * side + left + w] {
            added += usize::from(*unit == 0);
            *unit = 1;
        }
    }
    added
}

/// BEiT's `MaskingGenerator`: add rectangles (area uniform between 16 units and what is left
/// to mask, log-uniform aspect) that bring new units without overshooting the count, until
/// the count is reached or ten tries in a row bring nothing.
fn block<R: Rng + ?Sized>(rng: &mut R, units: &mut [u8], side: usize, count: usize) {
    let (low, high) = (BLOCK_MIN_ASPECT.ln(), (1.0 / BLOCK_MIN_ASPECT).ln());
    let mut masked = 0;
    while masked < count {
        let room = count - masked;
        let mut added = 0;
        for _ in 0..BLOCK_TRIES {
            let area = uniform(rng, BLOCK_MIN_UNITS as f64, room as f64);
            let aspect = uniform(rng, low, high).exp();
            let h = (area * aspect).sqrt().round() as usize;
            let w = (area / aspect).sqrt().round() as usize;
            if h == 0 || w == 0 || h >= side || w >= side {
                continue;
            }
            let top = rng.random_range(0..=side - h);
            let left = rng.random_range(0..=side - w);
            let new = h * w - super::masked_in(units, side, (top, left), (h, w));
            if new > 0 && new <= room {
                added += fill(units, side, (top, left), (h, w));
            }
            if added > 0 {
                break;
            }
        }
        if added == 0 {
            break;
        }
        masked += added;
    }
}

/// Python's `random.uniform(a, b)`: `a + (b - a) * U[0, 1)`, also when `b < a`.
fn uniform<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn count(units: &[u8]) -> usize {
        units.iter().map(|&u| usize::from(u)).sum()
    }

    #[test]
    fn a_square_is_one_square_of_the_nearest_area() {
        // 48x48 units (mask patch 4 at 192 px), ratio 0.6: ceil(0.6 * 2304) = 1383, side 37.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let units = MaskStrategy::Square.draw(&mut rng, 48, 1383);
            assert_eq!(count(&units), 37 * 37);
            let rows: Vec<usize> = (0..48)
                .filter(|r| units[r * 48..(r + 1) * 48].contains(&1))
                .collect();
            assert_eq!(rows.len(), 37);
            assert_eq!(rows[36] - rows[0], 36, "contiguous rows");
            for &r in &rows {
                assert_eq!(count(&units[r * 48..(r + 1) * 48]), 37, "row {r}");
            }
        }
    }

    #[test]
    fn blocks_reach_the_count_without_overshooting() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut reached = 0;
        for _ in 0..200 {
            let units = MaskStrategy::Block.draw(&mut rng, 14, 118); // 0.6 of 14x14
            let n = count(&units);
            assert!(n <= 118, "never more than the count: {n}");
            assert!(n >= 16, "at least one block: {n}");
            reached += usize::from(n == 118);
        }
        // BEiT's generator stops when ten tries in a row find no rectangle that fits the rest;
        // on a 14x14 grid most masks still reach the count.
        assert!(reached > 100, "{reached} of 200 reached the count");
    }

    /// Masked units with a masked neighbour to the right or below, per masked unit.
    fn adjacency(units: &[u8], side: usize) -> f64 {
        let mut pairs = 0;
        for r in 0..side {
            for c in 0..side {
                if units[r * side + c] == 1 {
                    pairs += usize::from(c + 1 < side && units[r * side + c + 1] == 1);
                    pairs += usize::from(r + 1 < side && units[(r + 1) * side + c] == 1);
                }
            }
        }
        pairs as f64 / count(units) as f64
    }

    #[test]
    fn blocks_are_compact_and_random_units_are_not() {
        // A filled rectangle has close to two inner edges per unit; units scattered at ratio
        // 0.3 about 2 * 0.3.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut block, mut random) = (0.0, 0.0);
        for _ in 0..50 {
            block += adjacency(&MaskStrategy::Block.draw(&mut rng, 24, 173), 24);
            random += adjacency(&MaskStrategy::Random.draw(&mut rng, 24, 173), 24);
        }
        let (block, random) = (block / 50.0, random / 50.0);
        assert!(block > 1.4, "block adjacency {block}");
        assert!((0.45..0.75).contains(&random), "random adjacency {random}");
    }
}
