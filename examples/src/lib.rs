//! Examples only: see the `[[example]]` programs next to this crate.
