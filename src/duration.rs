//! Durations and timestamps as the config file and the admin API spell them.
//!
//! Durations are read as humantime strings (`"30s"`, `"24h"`, `"7d"`) or as integer
//! seconds, and always written back in the largest whole unit of `s`, `m`, `h`
//! (`"24h"`, `"90s"`), so that what an operator typed round-trips. Timestamps are
//! Unix milliseconds inside the daemon and RFC 3339 UTC on the wire.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A whole number of seconds, parsed from `"30s"`-style strings or integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seconds(pub u64);

impl Seconds {
    /// Parses `"30s"`, `"1h 30m"`, `"7d"` or a bare number of seconds (`"30"`).
    pub fn parse(text: &str) -> Result<Seconds, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("a duration must not be empty (write e.g. \"30s\" or \"24h\")".into());
        }
        if let Ok(n) = trimmed.parse::<u64>() {
            return Ok(Seconds(n));
        }
        let parsed = humantime::parse_duration(trimmed).map_err(|e| {
            format!("\"{trimmed}\" is not a duration ({e}); write e.g. \"30s\", \"15m\" or \"24h\"")
        })?;
        if parsed.subsec_nanos() != 0 {
            return Err(format!(
                "\"{trimmed}\" is not a whole number of seconds; durations have a resolution of 1s"
            ));
        }
        Ok(Seconds(parsed.as_secs()))
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }

    pub fn as_millis(self) -> u64 {
        self.0.saturating_mul(1000)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s != 0 && s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or \"24h\", or a whole number of seconds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Seconds, E> {
                Seconds::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(Seconds)
                    .map_err(|_| E::custom(format!("a duration cannot be negative ({v})")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds: `2026-12-03T18:56:34.123Z`.
pub fn rfc3339(millis: u64) -> String {
    match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(millis as i64) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => String::from("invalid-time"),
    }
}

/// The `%Y-%m-%dT%H:%M:%S` UTC form (no zone suffix) used in exported object names.
pub fn object_time(millis: u64) -> String {
    match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(millis as i64) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S").to_string(),
        None => String::from("invalid-time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(Seconds::parse("30s").unwrap(), Seconds(30));
        assert_eq!(Seconds::parse("30").unwrap(), Seconds(30));
        assert_eq!(Seconds::parse("24h").unwrap(), Seconds(86_400));
        assert_eq!(Seconds::parse("7d").unwrap(), Seconds(604_800));
        assert_eq!(Seconds(86_400).to_string(), "24h");
        assert_eq!(Seconds(90).to_string(), "90s");
        assert_eq!(Seconds(120).to_string(), "2m");
        assert_eq!(Seconds(0).to_string(), "0s");
        assert!(Seconds::parse("abc").unwrap_err().contains("abc"));
        assert!(Seconds::parse("").is_err());
        assert!(Seconds::parse("1500ms").is_err());
    }

    #[test]
    fn json_accepts_strings_and_integers() {
        let s: Seconds = serde_json::from_str("\"1h\"").unwrap();
        assert_eq!(s, Seconds(3600));
        let s: Seconds = serde_json::from_str("45").unwrap();
        assert_eq!(s, Seconds(45));
        assert!(serde_json::from_str::<Seconds>("-1").is_err());
        assert!(serde_json::from_str::<Seconds>("true").is_err());
    }

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(1_620_137_610_000), "2021-05-04T14:13:30.000Z");
        assert_eq!(object_time(1_620_137_610_000), "2021-05-04T14:13:30");
    }
}
