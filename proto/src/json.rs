//! Strict JSON for requests: duplicate keys are an error (serde_json would keep the last one
//! silently, so two parsers could disagree about what a request asked for), and nesting is
//! bounded, also while a line is still arriving.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The deepest nesting of arrays and objects accepted (serde_json's own recursion limit).
pub const MAX_DEPTH: usize = 128;

/// Parses one JSON value, refusing duplicate keys in any object.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue::deserialize_from(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Whether the bytes of a line received so far already nest arrays and objects deeper than
/// `limit`, so the line can be refused before it ends. Brackets inside strings do not count.
pub fn nesting_exceeds(partial: &[u8], limit: usize) -> bool {
    let mut scanner = NestingScanner::new();
    scanner.feed(partial);
    scanner.max_depth() > limit
}

/// [`nesting_exceeds`] one piece at a time: the nesting of the bytes fed so far, for a reader
/// that gets a line in pieces and must not rescan what it already has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NestingScanner {
    depth: usize,
    max_depth: usize,
    in_string: bool,
    escaped: bool,
}

impl NestingScanner {
    /// A scanner at the start of a line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans more bytes of the line.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => {
                    self.depth += 1;
                    self.max_depth = self.max_depth.max(self.depth);
                }
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
    }

    /// The deepest nesting seen so far (0: no array or object opened).
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }
}

struct StrictValue;

impl StrictValue {
    fn deserialize_from<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> de::DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let value = map.next_value_seed(StrictValue)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert!(parse_strict(br#"{"a":1,"b":{"c":2}}"#).is_ok());
        let top = parse_strict(br#"{"op":"status","op":"fork.close"}"#).unwrap_err();
        assert!(top.to_string().contains("duplicate key `op`"), "{top}");
        assert!(parse_strict(br#"{"a":[{"x":1,"x":2}]}"#).is_err());
    }

    #[test]
    fn values_parse_as_serde_json_would() {
        let text = br#"{"n":-3,"u":18446744073709551615,"f":1.5,"s":"\u00e9","z":null,"l":[true]}"#;
        let strict = parse_strict(text).unwrap();
        let loose: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(strict, loose);
        assert!(parse_strict(b"{} trailing").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_early_and_strings_do_not_count() {
        let deep = vec![b'['; 100_000];
        assert!(nesting_exceeds(&deep, MAX_DEPTH));
        assert!(parse_strict(&deep).is_err());
        let shallow = format!("{{\"s\":\"{}\"}}", "[".repeat(1000));
        assert!(!nesting_exceeds(shallow.as_bytes(), MAX_DEPTH));
        assert!(!nesting_exceeds(b"[[[]]][[[]]]", 3));
        assert!(nesting_exceeds(b"[[[[", 3));
    }

    #[test]
    fn the_scanner_fed_in_pieces_agrees_with_one_scan() {
        let line = br#"{"a":[{"s":"\"[[[\\"},[[1]]],"b":{"c":[[[]]]}}"#;
        let mut whole = NestingScanner::new();
        whole.feed(line);
        assert_eq!(whole.max_depth(), 5);
        for split in 0..line.len() {
            let mut pieces = NestingScanner::new();
            pieces.feed(&line[..split]);
            pieces.feed(&line[split..]);
            assert_eq!(pieces, whole, "split at {split}");
        }
    }
}
