//! `cordon doctor` (being written).

/// Prints the host's support for each layer and runs a self-test.
pub fn doctor() -> i32 {
    eprintln!("cordon: doctor is not available in this build");
    125
}
