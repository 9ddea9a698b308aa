//! Bad-input cases: serve. Filled in by the hardening work.
