//! `${VAR}` and `${VAR:-default}` interpolation of the pipeline text from the environment.

/// A variable that was referenced but not set, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    pub name: String,
    /// Byte offset of the `${` in the original text.
    pub offset: usize,
}

/// Replaces `${VAR}` and `${VAR:-default}` in `text` with values from `lookup`.
///
/// `$$` is a literal `$`. Values are escaped for a TOML basic string (quotes, backslashes and control
/// characters), so a value can neither break out of the string it sits in nor add lines: line numbers
/// in later error messages still match the file on disk.
///
/// # Errors
/// Every variable that is referenced without a default and is not set is returned, so one run of
/// `sluice validate` lists them all.
pub fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Vec<MissingVar>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut copied = 0;
    while let Some(rel) = memchr::memchr(b'$', &bytes[i..]) {
        let at = i + rel;
        match bytes.get(at + 1) {
            Some(b'$') => {
                out.push_str(&text[copied..at + 1]);
                i = at + 2;
                copied = i;
            }
            Some(b'{') => {
                let Some(close) = text[at + 2..].find('}') else {
                    i = at + 1;
                    continue;
                };
                let inner = &text[at + 2..at + 2 + close];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                if !is_var_name(name) {
                    i = at + 1;
                    continue;
                }
                out.push_str(&text[copied..at]);
                match lookup(name).or_else(|| default.map(str::to_string)) {
                    Some(value) => escape_into(&value, &mut out),
                    None => missing.push(MissingVar { name: name.to_string(), offset: at }),
                }
                i = at + 2 + close + 1;
                copied = i;
            }
            _ => i = at + 1,
        }
    }
    out.push_str(&text[copied..]);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("kafka:9092".into()),
            "QUOTE" => Some("a\"b\\c\nd".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        let got = interpolate("a = \"${HOST}\"\nb = \"${PORT:-5432}\"\nc = \"$$HOME\"", env).unwrap();
        assert_eq!(got, "a = \"kafka:9092\"\nb = \"5432\"\nc = \"$HOME\"");
    }

    #[test]
    fn escapes_values_so_they_stay_one_toml_string_on_one_line() {
        let got = interpolate("x = \"${QUOTE}\"", env).unwrap();
        assert_eq!(got, "x = \"a\\\"b\\\\c\\nd\"");
        let parsed: toml::Table = toml::from_str(&got).unwrap();
        assert_eq!(parsed["x"].as_str(), Some("a\"b\\c\nd"));
    }

    #[test]
    fn reports_every_missing_variable_with_its_offset() {
        let err = interpolate("a = \"${NOPE}\"\nb = \"${ALSO_NOPE}\"", env).unwrap_err();
        assert_eq!(
            err,
            vec![MissingVar { name: "NOPE".into(), offset: 5 }, MissingVar { name: "ALSO_NOPE".into(), offset: 19 },]
        );
    }

    #[test]
    fn leaves_text_that_is_not_a_variable_alone() {
        let text = "q = \"SELECT '$' || x, '${not a var}' FROM t\"";
        assert_eq!(interpolate(text, env).unwrap(), text);
    }
}
