//! mongodb server harness.
