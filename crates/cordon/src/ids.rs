//! Session ids: ULIDs (time-ordered, 26 Crockford base32 characters).
//!
//! Guarantees: 48 bits of millisecond time followed by 80 bits from the kernel's CSPRNG, so ids
//! sort by start time and never collide in practice; they contain only `[0-9A-HJKMNP-TV-Z]`,
//! safe in paths and cgroup names.

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new session id.
pub fn new_session_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut rnd = [0u8; 10];
    // SAFETY: `rnd` is a valid writable buffer of the given length.
    let n = unsafe { libc::getrandom(rnd.as_mut_ptr() as *mut libc::c_void, rnd.len(), 0) };
    if n != rnd.len() as isize {
        // getrandom cannot fail for 10 bytes once the pool is initialised; fall back to the
        // clock and pid rather than abort.
        let mix = (ms as u64) ^ ((std::process::id() as u64) << 32);
        rnd[..8].copy_from_slice(&mix.to_le_bytes());
    }
    let mut value: u128 = (ms & ((1u128 << 48) - 1)) << 80;
    for (i, b) in rnd.iter().enumerate() {
        value |= (*b as u128) << (8 * (9 - i));
    }
    (0..26)
        .rev()
        .map(|i| ALPHABET[((value >> (5 * i)) & 31) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_26_crockford_characters_and_sort_by_time() {
        let a = new_session_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_session_id();
        assert_eq!(a.len(), 26);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert!(a < b, "{a} !< {b}");
    }
}
