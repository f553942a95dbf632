//! Keeps decimal values that arrow's parser gets wrong away from it.
//!
//! arrow-json and arrow-csv read a decimal column with arrow-cast's `parse_decimal` (59.3), which
//! counts digits in a `u8` and the exponent in an `i16` and multiplies with wrapping arithmetic.
//! On a huge exponent (`1E65537`), more than 255 digits, or an e-notation value of more than 38
//! digits it panics in a build with overflow checks and returns a wrong value in a release build
//! (`1E65537` reads as 10; apache/arrow-rs#10787, #10788). sluice never lets a wrong value through:
//! a record whose decimal value is outside the range arrow reads exactly is bad, dead-lettered
//! with an error naming the column and the value.
//!
//! The range read exactly, which [`unsafe_reason`] checks:
//! - plain notation: at most [`MAX_INTEGER_DIGITS`] significant digits before the point (any
//!   number of digits after it);
//! - e-notation: at most 38 mantissa digits and, for a positive exponent, an exponent of at most
//!   [`MAX_EXPONENT`]; for a negative one, mantissa digits plus the exponent at most 38.
//!
//! Clean input pays one scan of its bytes ([`might_be_unsafe`]); only a chunk where that scan sees
//! a suspect number (or, in JSON, a `\u` escape, which could spell one) is decoded a second time
//! with its decimal columns as text, to check each decimal value itself. Text that looks like an
//! exponent trips the scan too (the `e8400` of a UUID `550e8400-…`): such chunks pay that second,
//! narrower decode, never a wrong answer.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

/// Significant digits before the point that a plain-notation decimal may have. A decimal(38, s)
/// holds at most 38; arrow's own overflow check is right up to about 200.
pub const MAX_INTEGER_DIGITS: usize = 100;
/// Mantissa digits of an e-notation decimal; beyond this arrow's result wraps.
const MAX_MANTISSA_DIGITS: usize = 38;
/// A positive exponent beyond this overflows any decimal; arrow's counter wraps past 32767.
pub const MAX_EXPONENT: u64 = 99;

/// Why arrow would not read `text` exactly as a decimal, or None when it would (or when `text`
/// is not a number at all: arrow reports that itself).
pub fn unsafe_reason(text: &[u8]) -> Option<String> {
    let t = text.strip_prefix(b"-").or_else(|| text.strip_prefix(b"+")).unwrap_or(text);
    let (mantissa, exponent) = match t.iter().position(|b| matches!(b, b'e' | b'E')) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let digits = mantissa.iter().filter(|b| b.is_ascii_digit()).count();
    let Some(exponent) = exponent else {
        let integer = mantissa.split(|b| *b == b'.').next().unwrap_or_default();
        let significant = integer.iter().skip_while(|b| **b == b'0').filter(|b| b.is_ascii_digit()).count();
        return (significant > MAX_INTEGER_DIGITS)
            .then(|| format!("{significant} digits before the decimal point; at most {MAX_INTEGER_DIGITS} are read"));
    };
    // arrow adds up the exponent's digits before it looks at what follows them, so
    // `1E99999.5` overflows its counter although it is not a number: count those digits.
    let run: Vec<u8> =
        exponent.iter().copied().take_while(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-')).collect();
    let e_digits: Vec<u8> = run.iter().copied().filter(u8::is_ascii_digit).collect();
    if e_digits.is_empty() {
        return None;
    }
    let negative = run.contains(&b'-');
    let e = e_digits.iter().fold(0u64, |acc, b| acc.saturating_mul(10).saturating_add(u64::from(b - b'0')));
    if digits > MAX_MANTISSA_DIGITS {
        return Some(format!(
            "{digits} digits before the exponent; at most {MAX_MANTISSA_DIGITS} are read in e-notation"
        ));
    }
    if negative && (digits as u64).saturating_add(e) > MAX_MANTISSA_DIGITS as u64 {
        return Some(format!(
            "exponent -{}; in e-notation the digits plus a negative exponent are at most {MAX_MANTISSA_DIGITS}",
            shown(&e_digits)
        ));
    }
    if !negative && e > MAX_EXPONENT {
        return Some(format!("exponent {}; at most {MAX_EXPONENT}", shown(&e_digits)));
    }
    None
}

/// Whether `bytes` hold anything that could be a decimal value [`unsafe_reason`] refuses: false
/// means every value in them is safe, true means check the values themselves. A superset: numbers
/// inside text fields count too. `escapes` also counts JSON's `\u` escapes, which could spell one.
pub fn might_be_unsafe(bytes: &[u8], escapes: bool) -> bool {
    let mut run = 0usize; // consecutive digits
    let mut mantissa = 0usize; // digits of the number the run belongs to (across one point)
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_digit() {
            run += 1;
            mantissa += 1;
            if run > MAX_INTEGER_DIGITS {
                return true;
            }
        } else if matches!(b, b'e' | b'E') {
            // An exponent: [+-]?digits. Even without a mantissa: arrow reads `e60000096` as one.
            let mut j = i + 1;
            if matches!(bytes.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            let start = j;
            let mut e = 0u64;
            while let Some(d) = bytes.get(j).filter(|d| d.is_ascii_digit()) {
                e = e.saturating_mul(10).saturating_add(u64::from(d - b'0'));
                j += 1;
            }
            if j > start
                && (mantissa > MAX_MANTISSA_DIGITS || (mantissa as u64).saturating_add(e) > MAX_MANTISSA_DIGITS as u64)
            {
                return true;
            }
            run = 0;
            mantissa = 0;
        } else if b == b'.' {
            run = 0;
        } else {
            if escapes && b == b'\\' && bytes.get(i + 1) == Some(&b'u') {
                return true;
            }
            run = 0;
            mantissa = 0;
        }
        i += 1;
    }
    false
}

/// The first characters of a long value, for an error message.
fn shown(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}… ({} characters)", &s[..i], s.chars().count()),
        None => s.into_owned(),
    }
}

/// The decimal columns of a schema and a copy of it that reads them as text.
#[derive(Debug)]
pub struct DecimalGuard {
    /// The schema to decode with for the check: decimal leaves as Utf8.
    check_schema: SchemaRef,
    /// Columns of `check_schema` to check (names, for the error), by index.
    checked: Vec<(usize, String)>,
}

impl DecimalGuard {
    /// None when the schema has no decimal anywhere. `keep_all`: the check schema keeps every
    /// column (as text where it is not a decimal): CSV needs that, as columns are positional.
    pub fn new(schema: &Schema, keep_all: bool) -> Option<DecimalGuard> {
        let mut fields = Vec::new();
        let mut checked = Vec::new();
        for f in schema.fields() {
            match as_text(f.data_type()) {
                Some(t) => {
                    checked.push((fields.len(), f.name().clone()));
                    fields.push(Field::new(f.name(), t, true));
                }
                None if keep_all => fields.push(Field::new(f.name(), DataType::Utf8, true)),
                None => {}
            }
        }
        (!checked.is_empty()).then(|| DecimalGuard { check_schema: Arc::new(Schema::new(fields)), checked })
    }

    pub fn check_schema(&self) -> SchemaRef {
        self.check_schema.clone()
    }

    /// The first decimal value of `batch` (decoded with [`check_schema`](Self::check_schema))
    /// that arrow would not read exactly, as an error message.
    pub fn first_unsafe(&self, batch: &RecordBatch) -> Option<String> {
        self.checked.iter().find_map(|(i, name)| {
            first_unsafe_in(batch.column(*i)).map(|(value, why)| {
                format!(
                    "column `{name}`: the decimal value `{}` is outside the range sluice reads exactly ({why}); \
                     write it in plain notation or with a smaller exponent",
                    shown(value.as_bytes())
                )
            })
        })
    }
}

/// `t` with every decimal in it as Utf8, or None when it holds no decimal.
fn as_text(t: &DataType) -> Option<DataType> {
    match t {
        DataType::Decimal128(..) | DataType::Decimal256(..) => Some(DataType::Utf8),
        DataType::List(f) => as_text(f.data_type()).map(|t| DataType::List(Arc::new(Field::new(f.name(), t, true)))),
        _ => None,
    }
}

fn first_unsafe_in(array: &ArrayRef) -> Option<(String, String)> {
    match array.data_type() {
        DataType::Utf8 => array
            .as_string::<i32>()
            .iter()
            .flatten()
            .find_map(|v| unsafe_reason(v.as_bytes()).map(|why| (v.to_string(), why))),
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            first_unsafe_in(list.values())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_arrow_reads_exactly_pass_and_the_others_say_why() {
        for ok in [
            "0",
            "-12.50",
            "+7",
            "1.5e3",
            "1.5E+37",
            "12345678901234567890123456789012345678e0",
            "1e-37",
            "0.000000000000000000000000000000000000000000000001",
            "abc",
            "1e",
            "1e5.5",
            "",
        ] {
            assert_eq!(unsafe_reason(ok.as_bytes()), None, "{ok}");
        }
        let long = "9".repeat(101);
        let mantissa = format!("{}e1", "1".repeat(39));
        for (bad, why) in [
            ("1E65537", "exponent 65537"),
            // Not a number, but arrow overflows its exponent counter before it sees the point.
            ("99999999999999E9999999999999998.99", "exponent 9999999999999998"),
            ("1.E202021", "exponent 202021"),
            ("1e100", "exponent 100"),
            ("1.5e-38", "negative exponent"),
            ("-1e-99999", "negative exponent"),
            // Beyond u64: the sums saturate (a fuzz find in the guard itself).
            ("1e-99999999999999999999999999", "negative exponent"),
            ("1e+99999999999999999999999999", "exponent 99999999999999999999999999"),
            // No mantissa at all: arrow still adds up the exponent (a fuzz find).
            ("e60000096.99", "exponent 60000096"),
            (long.as_str(), "101 digits before the decimal point"),
            (mantissa.as_str(), "39 digits before the exponent"),
        ] {
            match unsafe_reason(bad.as_bytes()) {
                Some(reason) => assert!(reason.contains(why), "{bad}: {reason}"),
                None => assert!(why.is_empty(), "{bad} passed"),
            }
        }
        assert_eq!(unsafe_reason("0".repeat(300).as_bytes()), None, "leading zeros are not significant");
    }

    #[test]
    fn the_scan_flags_every_unsafe_value_and_passes_ordinary_records() {
        for line in [
            r#"{"amount": 1E65537}"#,
            r#"{"amount": "1.E202021"}"#,
            r#"{"amount": -1e-40}"#,
            "7,1.E202021,12",
            r#"{"amount": "\u0031e99999"}"#,
            "1,5e-99999999999999999999999999,x",
            r#"{"amount": "e60000096.99"}"#,
            "0200,e04000000000002,12.5",
        ] {
            assert!(might_be_unsafe(line.as_bytes(), true), "{line}");
        }
        let long = format!("{{\"amount\": {}}}", "9".repeat(101));
        assert!(might_be_unsafe(long.as_bytes(), false));
        for line in [
            r#"{"order_id": 12345678901, "amount": 1234.56, "ts": "2026-12-03T10:00:00Z", "note": "e5 e"}"#,
            "1,2.5e3,Berlin,1e-5",
            r#"{"name": "caf\u00e9"}"#,
        ] {
            let escapes = !line.contains("\\u");
            assert!(!might_be_unsafe(line.as_bytes(), escapes), "{line}");
        }
        // Every value unsafe_reason refuses is flagged by the scan, within a record too.
        for v in ["1e100", "1.5e-38", "1e65537", "12345678901234567890123456789012345678.9e0", &"7".repeat(101)] {
            assert!(unsafe_reason(v.as_bytes()).is_some(), "{v}");
            assert!(might_be_unsafe(format!("x,{v},y").as_bytes(), false), "{v}");
        }
    }
}
