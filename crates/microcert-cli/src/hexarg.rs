//! Parsers for fixed-length hexadecimal command-line arguments.

/// Parses exactly `N` bytes of hex (upper or lower case).
pub fn parse_fixed<const N: usize>(s: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("not hexadecimal: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("expected {} hex digits, got {}", 2 * N, 2 * b.len()))
}

/// An 8-byte value such as a device id, nonce or audience (16 hex digits).
pub fn hex8(s: &str) -> Result<[u8; 8], String> {
    parse_fixed::<8>(s)
}

/// A 16-byte value such as a challenge or a key (32 hex digits).
pub fn hex16(s: &str) -> Result<[u8; 16], String> {
    parse_fixed::<16>(s)
}

/// Any number of bytes, as hex (whitespace allowed between digits).
pub fn hex_any(s: &str) -> Result<Vec<u8>, String> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(compact).map_err(|e| format!("not hexadecimal: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_lengths() {
        assert!(hex8("0011").is_err());
        assert!(hex8("00112233445566778899").is_err());
        assert_eq!(hex8("0011223344556677").unwrap()[7], 0x77);
        assert!(hex16("zz").is_err());
    }
}
