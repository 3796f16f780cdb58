//! chroma integration tests (real server).
