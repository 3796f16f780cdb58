//! Chroma's data directory (a persist directory copy), preseeded before the server starts
//! (being built: refuses with a clear error).

use std::path::Path;

use super::super::Emptiness;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Whether a Chroma persist directory may be preseeded.
pub fn data_dir_state(_dir: &Path) -> Result<Emptiness> {
    Err(Error::engine(
        super::ENGINE,
        "data-directory preseed is not supported by this build yet",
    ))
}

/// Writes a set's data copy into an empty persist directory.
pub fn preseed_data_dir(_dir: &Path, _set: &SetReader, _entry: &EngineEntry) -> Result<()> {
    Err(Error::engine(
        super::ENGINE,
        "data-directory preseed is not supported by this build yet",
    ))
}
