//! Bad-input cases: data. Filled in by the hardening work.
