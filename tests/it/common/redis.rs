//! redis server harness.
