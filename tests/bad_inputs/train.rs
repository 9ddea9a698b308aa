//! Bad-input cases: train. Filled in by the hardening work.
