//! Validation of the names operators choose (streams, sinks, exporters, tokens).
//!
//! One rule for every resource, so that a name valid in one place is valid everywhere
//! and fits in object paths and CLI arguments without quoting.

/// 1 to 64 characters of `a-z 0-9 - _ .`, not starting with `.`.
pub fn validate(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "{kind} name must be 1 to 64 characters long (got {})",
            name.chars().count()
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{kind} name must not start with '.'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
    {
        return Err(format!(
            "{kind} name may only contain a-z, 0-9, '-', '_' and '.' (found {c:?})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_and_rejects() {
        assert!(validate("stream", "stream-machine_1.v2").is_ok());
        assert!(validate("stream", &"a".repeat(64)).is_ok());
        assert!(validate("stream", "").is_err());
        assert!(validate("stream", &"a".repeat(65)).is_err());
        assert!(validate("stream", ".hidden").is_err());
        assert!(validate("stream", "Upper").unwrap_err().contains("'U'"));
        assert!(validate("stream", "a/b").is_err());
        assert!(validate("stream", "a b").is_err());
    }
}
