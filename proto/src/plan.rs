//! Which samples each rank trains on at each step: a pure function of the seed, the epoch,
//! the position in the epoch's order (the cursor) and the batch shape, so any process, after
//! any restart, computes the same plan. The cursor (not the step) is what a checkpoint
//! records, so a run that resumes with another world size continues the same epoch where
//! it stopped: every sample of an epoch is still used at most once.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The shape of a run's data consumption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlan {
    pub seed: u64,
    pub dataset_len: usize,
    pub world_size: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
}

impl DataPlan {
    /// Samples per optimizer step, over all ranks and accumulation micro-steps.
    pub fn global_batch(&self) -> usize {
        self.world_size * self.micro_batch * self.accumulation
    }

    /// Full global batches per epoch; the partial last window is dropped so every rank runs
    /// the same number of steps.
    pub fn steps_per_epoch(&self) -> u64 {
        (self.dataset_len / self.global_batch().max(1)) as u64
    }

    /// The epoch's order of sample ids, shuffled from `(seed, epoch)` alone.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.dataset_len as u32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, epoch));
        order.shuffle(&mut rng);
        order
    }

    /// The ids for `rank`, micro-step `micro`, of the step that starts at `cursor`: the step's
    /// window of `global_batch` ids is cut into consecutive micro-batches, micro-step-major,
    /// then rank.
    pub fn ids_at<'a>(
        &self,
        order: &'a [u32],
        cursor: Cursor,
        rank: usize,
        micro: usize,
    ) -> &'a [u32] {
        let start = cursor.offset as usize + (micro * self.world_size + rank) * self.micro_batch;
        &order[start..start + self.micro_batch]
    }

    /// `cursor`, or the start of the next epoch when fewer than a global batch remain (the
    /// partial window is dropped, so every rank runs the same steps).
    pub fn settle(&self, cursor: Cursor) -> Cursor {
        if cursor.offset as usize + self.global_batch() > self.dataset_len {
            Cursor {
                epoch: cursor.epoch + 1,
                offset: 0,
            }
        } else {
            cursor
        }
    }

    /// Where the step after the one at `cursor` starts.
    pub fn advance(&self, cursor: Cursor) -> Cursor {
        self.settle(Cursor {
            epoch: cursor.epoch,
            offset: cursor.offset + self.global_batch() as u64,
        })
    }
}

/// A position in the data: the epoch and how many of its ordered samples are consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub offset: u64,
}

/// A seed for a sub-stream of randomness (an epoch's shuffle, a sample's crop and mask):
/// SplitMix64 over the combined inputs, so nearby inputs give unrelated streams.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_once_per_epoch_over_ranks_and_micro_steps() {
        let plan = DataPlan {
            seed: 7,
            dataset_len: 103,
            world_size: 3,
            micro_batch: 4,
            accumulation: 2,
        };
        assert_eq!(plan.steps_per_epoch(), 4); // 103 / 24
        let mut cursor = plan.settle(Cursor::default());
        for epoch in 0..2 {
            let order = plan.epoch_order(epoch);
            let mut seen = vec![0u32; plan.dataset_len];
            for _ in 0..plan.steps_per_epoch() {
                assert_eq!(cursor.epoch, epoch);
                for rank in 0..3 {
                    for micro in 0..2 {
                        for &id in plan.ids_at(&order, cursor, rank, micro) {
                            seen[id as usize] += 1;
                        }
                    }
                }
                cursor = plan.advance(cursor);
            }
            assert!(seen.iter().all(|&n| n <= 1), "a sample was used twice");
            assert_eq!(seen.iter().sum::<u32>(), 96, "all full windows used");
        }
    }

    #[test]
    fn a_resized_run_continues_the_epoch_without_repeating_samples() {
        let three = DataPlan {
            seed: 1,
            dataset_len: 100,
            world_size: 3,
            micro_batch: 4,
            accumulation: 1,
        };
        let two = DataPlan {
            world_size: 2,
            ..three
        };
        let order = three.epoch_order(0);
        let mut seen = vec![0u32; 100];
        let mut cursor = three.settle(Cursor::default());
        for _ in 0..3 {
            for rank in 0..3 {
                for &id in three.ids_at(&order, cursor, rank, 0) {
                    seen[id as usize] += 1;
                }
            }
            cursor = three.advance(cursor);
        }
        // A rank died: two ranks continue from the same cursor until the epoch ends.
        cursor = two.settle(cursor);
        while cursor.epoch == 0 {
            for rank in 0..2 {
                for &id in two.ids_at(&order, cursor, rank, 0) {
                    seen[id as usize] += 1;
                }
            }
            cursor = two.advance(cursor);
        }
        assert!(seen.iter().all(|&n| n <= 1));
        assert_eq!(
            seen.iter().sum::<u32>(),
            36 + 64,
            "3 steps of 12, then 8 of 8"
        );
        assert_eq!(
            cursor,
            Cursor {
                epoch: 1,
                offset: 0
            }
        );
    }

    #[test]
    fn epochs_are_shuffled_differently_and_reproducibly() {
        let plan = DataPlan {
            seed: 1,
            dataset_len: 50,
            world_size: 1,
            micro_batch: 5,
            accumulation: 1,
        };
        assert_eq!(plan.epoch_order(0), plan.epoch_order(0));
        assert_ne!(plan.epoch_order(0), plan.epoch_order(1));
        let other_seed = DataPlan { seed: 2, ..plan };
        assert_ne!(plan.epoch_order(0), other_seed.epoch_order(0));
    }

    #[test]
    fn two_ranks_cover_what_one_rank_with_double_batch_covers() {
        let one = DataPlan {
            seed: 3,
            dataset_len: 64,
            world_size: 1,
            micro_batch: 8,
            accumulation: 1,
        };
        let two = DataPlan {
            world_size: 2,
            micro_batch: 4,
            ..one
        };
        let order = one.epoch_order(0);
        let mut cursor = one.settle(Cursor::default());
        for _ in 0..one.steps_per_epoch() {
            let mut a: Vec<u32> = one.ids_at(&order, cursor, 0, 0).to_vec();
            let mut b: Vec<u32> = (0..2)
                .flat_map(|r| two.ids_at(&order, cursor, r, 0).to_vec())
                .collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
            assert_eq!(
                one.advance(cursor),
                two.advance(cursor),
                "same global batch"
            );
            cursor = one.advance(cursor);
        }
    }
}
