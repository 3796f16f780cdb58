//! redis integration tests (real server).
