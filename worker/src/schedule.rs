//! Learning rate per optimizer step, as the official `lr_scheduler.py` builds it from timm:
//! linear warmup from `warmup_lr`, then cosine (over all steps, warmup included, as timm's
//! `warmup_prefix=False` does) down to `min_lr`, or multistep decay. All three rates are
//! scaled by `global batch / 512` before use.

use simmim_proto::run_config::{LrSchedule, TrainSection};

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_lr: f64,
    pub min_lr: f64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    /// Steps at which multistep decay multiplies by `gamma`; empty for cosine.
    milestones: Option<(Vec<u64>, f64)>,
}

impl Schedule {
    pub fn new(train: &TrainSection, steps_per_epoch: u64, lr_scale: f64) -> Self {
        let steps = |epochs: f64| (epochs * steps_per_epoch as f64).round() as u64;
        Self {
            base_lr: train.base_lr * lr_scale,
            warmup_lr: train.warmup_lr * lr_scale,
            min_lr: train.min_lr * lr_scale,
            total_steps: steps(train.epochs).max(1),
            warmup_steps: steps(train.warmup_epochs),
            milestones: match &train.lr_schedule {
                LrSchedule::Cosine => None,
                LrSchedule::Multistep { milestones, gamma } => {
                    Some((milestones.iter().map(|&e| steps(e)).collect(), *gamma))
                }
            },
        }
    }

    /// The learning rate at `step`, counted in steps of the configured global batch (a
    /// fraction when a resized world trains with another global batch).
    pub fn lr(&self, step: f64) -> f64 {
        if step < self.warmup_steps as f64 {
            return self.warmup_lr
                + step * (self.base_lr - self.warmup_lr) / self.warmup_steps as f64;
        }
        match &self.milestones {
            None if step >= self.total_steps as f64 => self.min_lr,
            None => {
                let progress = step / self.total_steps as f64;
                self.min_lr
                    + 0.5
                        * (self.base_lr - self.min_lr)
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Some((milestones, gamma)) => {
                let passed = milestones.iter().filter(|&&m| m as f64 <= step).count();
                self.base_lr * gamma.powi(passed as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simmim_proto::RunConfig;

    fn train(schedule: LrSchedule) -> TrainSection {
        let mut t = RunConfig::demo().train;
        (t.epochs, t.warmup_epochs, t.base_lr, t.warmup_lr, t.min_lr) =
            (10.0, 1.0, 1e-3, 1e-6, 1e-5);
        t.lr_schedule = schedule;
        t
    }

    #[test]
    fn cosine_matches_timm_values() {
        let s = Schedule::new(&train(LrSchedule::Cosine), 100, 1.0);
        assert_eq!((s.total_steps, s.warmup_steps), (1000, 100));
        assert!((s.lr(0.0) - 1e-6).abs() < 1e-15);
        assert!((s.lr(50.0) - (1e-6 + 50.0 * (1e-3 - 1e-6) / 100.0)).abs() < 1e-15);
        // timm without warmup_prefix: at t = warmup the cosine has already run 10%.
        let at =
            |t: f64| 1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI * t / 1000.0).cos());
        assert!((s.lr(100.0) - at(100.0)).abs() < 1e-15);
        assert!((s.lr(999.0) - at(999.0)).abs() < 1e-15);
        assert_eq!(s.lr(1000.0), 1e-5);
    }

    #[test]
    fn multistep_decays_at_milestones_and_scale_applies() {
        let s = Schedule::new(
            &train(LrSchedule::Multistep {
                milestones: vec![7.0],
                gamma: 0.1,
            }),
            10,
            2.0,
        );
        assert!((s.lr(10.0) - 2e-3).abs() < 1e-15);
        assert!((s.lr(69.0) - 2e-3).abs() < 1e-15);
        assert!((s.lr(70.0) - 2e-4).abs() < 1e-15);
        assert!((s.lr(0.0) - 2e-6).abs() < 1e-15);
    }
}
