//! chroma server harness.
