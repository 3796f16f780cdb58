//! mongodb integration tests (real server).
