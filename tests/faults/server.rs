//! (filled in by the fault-suite work)
