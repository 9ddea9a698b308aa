//! Bad-input cases: adapters. Filled in by the hardening work.
