//! Learning-rate schedules as transformers' `get_scheduler` computes them: linear warm-up from
//! 0, then constant, linear decay to 0, or half-cosine decay to 0. A pure function of the
//! step, so resuming needs only the step number.
use super::config::{ScheduleKind, SchedulerConfig};

#[derive(Debug, Clone)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn new(cfg: &SchedulerConfig, peak_lr: f64, total_steps: usize) -> Self {
        let warmup_steps = if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as usize
        };
        Self { kind: cfg.kind, peak_lr, warmup_steps, total_steps }
    }

    /// The learning rate of optimizer step `step` (0-based), as the LambdaLR of transformers'
    /// schedulers returns it for that step.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                ((self.total_steps.saturating_sub(step)) as f64 / decay_steps).max(0.0)
            }
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: usize, total: usize) -> Schedule {
        Schedule::new(
            &SchedulerConfig { kind, warmup_steps: warmup, warmup_ratio: 0.0 },
            1.0,
            total,
        )
    }

    #[test]
    fn matches_transformers_closed_forms() {
        // transformers: linear lambda = (total - step) / (total - warmup) after warm-up.
        let s = sched(ScheduleKind::Linear, 2, 10);
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(1), 0.5);
        assert_eq!(s.lr(2), 1.0);
        assert!((s.lr(6) - 0.5).abs() < 1e-12);
        // cosine lambda = 0.5 (1 + cos(pi progress)).
        let c = sched(ScheduleKind::Cosine, 0, 4);
        assert_eq!(c.lr(0), 1.0);
        assert!((c.lr(2) - 0.5).abs() < 1e-12);
        assert!((c.lr(1) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12);
        let k = sched(ScheduleKind::Constant, 3, 10);
        assert_eq!((k.lr(0), k.lr(3), k.lr(9)), (0.0, 1.0, 1.0));
        let r = Schedule::new(
            &SchedulerConfig { kind: ScheduleKind::Linear, warmup_steps: 0, warmup_ratio: 0.1 },
            1.0,
            25,
        );
        assert_eq!(r.warmup_steps, 3);
    }
}
