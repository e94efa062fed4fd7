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

/// Milliseconds since the session id was made, if it is one of ours.
pub fn age_ms(id: &str) -> Option<u64> {
    if id.len() != 26 {
        return None;
    }
    let mut value: u128 = 0;
    for c in id.bytes() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u128;
        value = (value << 5) | digit;
    }
    let made = (value >> 80) as u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some(now.saturating_sub(made))
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

    #[test]
    fn a_fresh_id_is_young_and_foreign_names_have_no_age() {
        let a = new_session_id();
        assert!(age_ms(&a).unwrap() < 1000);
        assert_eq!(age_ms("_supervisor"), None);
        assert_eq!(age_ms("not-a-ulid-but-26-chars-xx"), None);
    }
}
