//! Bad-input cases: plugins. Filled in by the hardening work.
