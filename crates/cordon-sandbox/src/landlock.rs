//! Landlock (being written).
