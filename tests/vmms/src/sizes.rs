//! Sizes and ranges on the test VMMs' command lines: `4096`, `0x1000`, `64K`, `1M`, `2G`, and
//! `OFF:LEN` ranges of them.

/// A size with an optional K, M or G suffix (binary units); hex with `0x`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse()
    };
    n.map_err(|e| format!("bad size `{s}`: {e}"))?
        .checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` overflows"))
}

/// A range as `OFF:LEN`.
pub fn parse_range(rest: &str) -> Result<(u64, u64), String> {
    let (off, len) = rest.split_once(':').ok_or("a range is OFF:LEN")?;
    Ok((parse_size(off)?, parse_size(len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_hex() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_range("1M:4K"), Ok((1 << 20, 4096)));
    }
}
