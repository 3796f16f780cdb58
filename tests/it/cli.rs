//! Configuration, usage and repository behaviour of the binary that needs no database.
