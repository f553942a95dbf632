//! The fast path of NDJSON decoding: flat objects whose values are plain JSON scalars of their
//! column's type, the shape of nearly every event stream.
//!
//! It is a fast path, not a second decoder with rules of its own. It accepts only what it decodes
//! exactly as arrow-json does and gives up ([`FastJson::decode`] returns `None`) on anything else:
//! a value of another JSON type than the column's, a float, a decimal in e-notation or with more
//! fractional digits than the scale, a timestamp in any but the plain ISO 8601 forms, an escaped or
//! repeated key, a missing or null `not null` field, broken JSON. arrow-json then decodes the same
//! bytes, and reports the errors, exactly as it did before. The JSON itself is parsed by serde_json
//! (validating, also inside ignored fields); values go straight into Arrow builders, with no tape
//! in between. `tests` and the `json` fuzz target check that whatever the fast path accepts comes
//! out equal to arrow-json's batch.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, Int8Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Column types the fast path decodes; a schema with any other type does not take it.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    I8,
    I16,
    I32,
    I64,
    F64,
    Utf8,
    Decimal { precision: u8, scale: u8 },
    TimestampMicros,
    Date,
}

/// The fast path for one schema.
#[derive(Debug)]
pub struct FastJson {
    schema: SchemaRef,
    kinds: Vec<Kind>,
    names: Vec<Box<[u8]>>,
    /// Bit `i` set: column `i` is `not null`.
    required: u64,
    /// Bit `i` set for every column.
    all: u64,
    /// Bit `i` set: column `i`'s name has no quote, backslash or control character, so it is
    /// equal to a key exactly where the key's bytes are the name's.
    plain: u64,
}

impl FastJson {
    /// `None` when the schema has a column type the fast path does not decode (lists, binary,
    /// times, other timestamp units or zones), or more than 63 columns.
    pub fn new(schema: &SchemaRef) -> Option<Self> {
        let fields = schema.fields();
        if fields.is_empty() || fields.len() > 63 {
            return None;
        }
        let mut kinds = Vec::with_capacity(fields.len());
        let mut required = 0u64;
        for (i, f) in fields.iter().enumerate() {
            kinds.push(match f.data_type() {
                DataType::Boolean => Kind::Bool,
                DataType::Int8 => Kind::I8,
                DataType::Int16 => Kind::I16,
                DataType::Int32 => Kind::I32,
                DataType::Int64 => Kind::I64,
                DataType::Float64 => Kind::F64,
                DataType::Utf8 => Kind::Utf8,
                DataType::Decimal128(p, s) if *s >= 0 => Kind::Decimal { precision: *p, scale: *s as u8 },
                DataType::Timestamp(TimeUnit::Microsecond, None) => Kind::TimestampMicros,
                DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) if &**tz == "UTC" => Kind::TimestampMicros,
                DataType::Date32 => Kind::Date,
                _ => return None,
            });
            if !f.is_nullable() {
                required |= 1 << i;
            }
        }
        let names: Vec<Box<[u8]>> = fields.iter().map(|f| f.name().as_bytes().into()).collect();
        if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
            return None;
        }
        let plain = names
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.iter().any(|c| matches!(c, b'"' | b'\\' | 0..=0x1f)))
            .fold(0u64, |bits, (i, _)| bits | 1 << i);
        Some(FastJson { schema: schema.clone(), kinds, names, required, all: (1u64 << fields.len()) - 1, plain })
    }

    /// Decodes `bytes`, which hold `rows` JSON objects separated by whitespace, into one batch,
    /// or `None` when any of them is outside what the fast path decodes exactly as arrow-json.
    pub fn decode(&self, bytes: &[u8], rows: usize) -> Option<RecordBatch> {
        if rows == 0 {
            return None;
        }
        // The scanner checks the bytes as it goes (a string's UTF-8 where it is not ASCII; no
        // escape at all, so no unpaired surrogate): only serde_json's tier needs the whole chunk
        // checked first.
        let cols = match self.scan(bytes, rows) {
            Some(cols) => cols,
            None => self.parse(checked_text(bytes)?, rows)?,
        };
        self.batch(cols)
    }

    fn batch(&self, cols: Vec<Col>) -> Option<RecordBatch> {
        let arrays: Vec<ArrayRef> =
            cols.into_iter().zip(self.schema.fields()).map(|(c, f)| c.finish(f.data_type())).collect::<Option<_>>()?;
        RecordBatch::try_new(self.schema.clone(), arrays).ok()
    }

    /// The first tier: a scanner of its own for the plainest input, flat objects of scalars with
    /// no escape in any string and no nested value even in ignored fields, which is most event
    /// streams. `None` where it is not sure: then [`parse`](Self::parse) decides. Every byte of
    /// `text` passes through it, so it takes only valid UTF-8 (see [`Scan::string`]).
    fn scan(&self, text: &[u8], rows: usize) -> Option<Vec<Col>> {
        let mut cols = self.columns(rows, text.len());
        let mut scan = Scan { text, at: 0 };
        for _ in 0..rows {
            let seen = self.scan_record(&mut scan, &mut cols)?;
            self.fill_missing(seen, &mut cols)?;
        }
        scan.whitespace();
        (scan.at == text.len()).then_some(cols)
    }

    /// One object of the chunk into one row of every column: the bits of the columns it had.
    fn scan_record(&self, scan: &mut Scan<'_>, cols: &mut [Col]) -> Option<u64> {
        scan.whitespace();
        scan.eat(b'{')?;
        scan.whitespace();
        if scan.eat(b'}').is_some() {
            return Some(0);
        }
        let (mut seen, mut hint) = (0u64, 0);
        loop {
            scan.eat(b'"')?;
            // Most records have their fields in the schema's order: the next column's name, then
            // its closing quote, is that key without scanning it as a string first (a name with a
            // quote, backslash or control character is never compared so).
            let column = match self.names.get(hint) {
                Some(name) if self.plain & (1 << hint) != 0 && scan.key(name) => Some(hint),
                _ => self.column(scan.string()?.as_bytes(), hint),
            };
            scan.whitespace();
            scan.eat(b':')?;
            scan.whitespace();
            match column {
                Some(i) => {
                    if seen & (1 << i) != 0 {
                        return None;
                    }
                    seen |= 1 << i;
                    hint = i + 1;
                    scan.value(&mut cols[i], self.required & (1 << i) != 0)?;
                }
                None => scan.skip_scalar()?,
            }
            scan.whitespace();
            match scan.next()? {
                b',' => scan.whitespace(),
                b'}' => return Some(seen),
                _ => return None,
            }
        }
    }

    /// The second tier: serde_json parses the chunk (validating everything, escapes and nested
    /// values in ignored fields included) and values go into the builders. `None` where
    /// arrow-json must decide.
    fn parse(&self, text: &str, rows: usize) -> Option<Vec<Col>> {
        let mut cols = self.columns(rows, text.len());
        let mut de = serde_json::Deserializer::from_str(text);
        for _ in 0..rows {
            let seen = Record { fast: self, cols: &mut cols }.deserialize(&mut de).ok()?;
            self.fill_missing(seen, &mut cols)?;
        }
        de.end().ok()?;
        Some(cols)
    }

    fn columns(&self, rows: usize, bytes: usize) -> Vec<Col> {
        self.kinds.iter().map(|k| Col::new(*k, rows, bytes)).collect()
    }

    /// Nulls in the columns a record did not have (`seen`); `None` when one is `not null`.
    fn fill_missing(&self, seen: u64, cols: &mut [Col]) -> Option<()> {
        let missing = self.all & !seen;
        if missing != 0 {
            if missing & self.required != 0 {
                return None;
            }
            for (i, col) in cols.iter_mut().enumerate() {
                if missing & (1 << i) != 0 {
                    col.append_null();
                }
            }
        }
        Some(())
    }

    fn column(&self, key: &[u8], hint: usize) -> Option<usize> {
        if self.names.get(hint).is_some_and(|n| same(n, key)) {
            return Some(hint);
        }
        self.names.iter().position(|n| same(n, key))
    }
}

/// One column being built.
enum Col {
    Bool(BooleanBuilder),
    I8(Int8Builder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
    Decimal(Decimal128Builder, u8, u8),
    Timestamp(TimestampMicrosecondBuilder),
    Date(Date32Builder),
}

impl Col {
    fn new(kind: Kind, rows: usize, bytes: usize) -> Col {
        match kind {
            Kind::Bool => Col::Bool(BooleanBuilder::with_capacity(rows)),
            Kind::I8 => Col::I8(Int8Builder::with_capacity(rows)),
            Kind::I16 => Col::I16(Int16Builder::with_capacity(rows)),
            Kind::I32 => Col::I32(Int32Builder::with_capacity(rows)),
            Kind::I64 => Col::I64(Int64Builder::with_capacity(rows)),
            Kind::F64 => Col::F64(Float64Builder::with_capacity(rows)),
            // A guess that fits most string columns of a chunk without regrowing; never more
            // than the chunk itself.
            Kind::Utf8 => Col::Utf8(StringBuilder::with_capacity(rows, (rows * 16).min(bytes))),
            Kind::Decimal { precision, scale } => {
                Col::Decimal(Decimal128Builder::with_capacity(rows), precision, scale)
            }
            Kind::TimestampMicros => Col::Timestamp(TimestampMicrosecondBuilder::with_capacity(rows)),
            Kind::Date => Col::Date(Date32Builder::with_capacity(rows)),
        }
    }

    fn append_null(&mut self) {
        match self {
            Col::Bool(b) => b.append_null(),
            Col::I8(b) => b.append_null(),
            Col::I16(b) => b.append_null(),
            Col::I32(b) => b.append_null(),
            Col::I64(b) => b.append_null(),
            Col::F64(b) => b.append_null(),
            Col::Utf8(b) => b.append_null(),
            Col::Decimal(b, ..) => b.append_null(),
            Col::Timestamp(b) => b.append_null(),
            Col::Date(b) => b.append_null(),
        }
    }

    /// A JSON integer (serde_json hands over exactly those that fit an `i64` or `u64`).
    fn append_int(&mut self, v: i128) -> Option<()> {
        match self {
            Col::I8(b) => b.append_value(i8::try_from(v).ok()?),
            Col::I16(b) => b.append_value(i16::try_from(v).ok()?),
            Col::I32(b) => b.append_value(i32::try_from(v).ok()?),
            Col::I64(b) => b.append_value(i64::try_from(v).ok()?),
            // Exactly representable, so the same double arrow parses from the text. Zero is left
            // to arrow: `-0` is a negative zero there.
            Col::F64(b) if v != 0 && v.unsigned_abs() <= 1 << 53 => b.append_value(v as f64),
            Col::Decimal(b, precision, scale) => {
                let v = v.checked_mul(10i128.checked_pow(u32::from(*scale))?)?;
                if v.unsigned_abs() >= 10u128.checked_pow(u32::from(*precision))? {
                    return None;
                }
                b.append_value(v)
            }
            _ => return None,
        }
        Some(())
    }

    /// A decimal column's value as it is in the input: a number, a string without escapes (the
    /// same digits as a number for arrow-json), or `null`.
    fn append_raw_decimal(&mut self, raw: &str, required: bool) -> Option<()> {
        match raw.as_bytes().first()? {
            b'n' if !required => self.append_null(),
            b'"' => {
                let s = raw.strip_prefix('"')?.strip_suffix('"')?;
                if s.contains('\\') {
                    return None;
                }
                self.append_str(s)?
            }
            b'-' | b'0'..=b'9' => self.append_str(raw)?,
            _ => return None,
        }
        Some(())
    }

    fn append_str(&mut self, s: &str) -> Option<()> {
        match self {
            Col::Utf8(b) => b.append_value(s),
            Col::Decimal(b, precision, scale) => b.append_value(parse_decimal(s, *precision, *scale)?),
            Col::Timestamp(b) => b.append_value(parse_timestamp_micros(s)?),
            Col::Date(b) => {
                if s.len() != 10 {
                    return None;
                }
                b.append_value(i32::try_from(parse_date(s.as_bytes())?).ok()?)
            }
            _ => return None,
        }
        Some(())
    }

    fn finish(self, data_type: &DataType) -> Option<ArrayRef> {
        Some(match self {
            Col::Bool(mut b) => Arc::new(b.finish()),
            Col::I8(mut b) => Arc::new(b.finish()),
            Col::I16(mut b) => Arc::new(b.finish()),
            Col::I32(mut b) => Arc::new(b.finish()),
            Col::I64(mut b) => Arc::new(b.finish()),
            Col::F64(mut b) => Arc::new(b.finish()),
            Col::Utf8(mut b) => Arc::new(b.finish()),
            Col::Decimal(mut b, precision, scale) => {
                Arc::new(b.finish().with_precision_and_scale(precision, scale as i8).ok()?)
            }
            Col::Timestamp(mut b) => Arc::new(b.finish().with_data_type(data_type.clone())),
            Col::Date(mut b) => Arc::new(b.finish()),
        })
    }
}

/// The scanner of [`FastJson::scan`] over a chunk's text; every method returns `None` (gives
/// up) on anything but what it expects.
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn whitespace(&mut self) {
        let b = self.text;
        while matches!(b.get(self.at), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.text[self.at..].starts_with(word.as_bytes()).then(|| self.at += word.len())
    }

    /// Whether the rest of a key whose opening quote was read is `name` and its closing quote;
    /// past them when it is.
    fn key(&mut self, name: &[u8]) -> bool {
        let end = self.at + name.len();
        let found = self.text.get(self.at..end).is_some_and(|k| same(k, name)) && self.text.get(end) == Some(&b'"');
        if found {
            self.at = end + 1;
        }
        found
    }

    /// The rest of a string whose opening quote was read: its text, when it has no escape and
    /// no control character (JSON allows none unescaped) and is valid UTF-8.
    fn string(&mut self) -> Option<&'a str> {
        let b = self.text;
        let (end, ascii) = string_end(b, self.at)?;
        if b[end] != b'"' {
            return None;
        }
        let s = &b[self.at..end];
        self.at = end + 1;
        if ascii {
            // SAFETY: every byte of `s` is below 0x80 (`string_end` saw no other), so ASCII,
            // which is valid UTF-8.
            Some(unsafe { std::str::from_utf8_unchecked(s) })
        } else {
            std::str::from_utf8(s).ok()
        }
    }

    /// A JSON number, its whole grammar checked: its text, and whether it is an integer (no
    /// fraction, no exponent).
    fn number(&mut self) -> Option<(&'a str, bool)> {
        let b = self.text;
        let digits = |at: &mut usize| {
            let from = *at;
            while b.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at > from
        };
        let start = self.at;
        let mut at = start;
        if b.get(at) == Some(&b'-') {
            at += 1;
        }
        match b.get(at)? {
            b'0' => at += 1,
            b'1'..=b'9' => {
                digits(&mut at);
            }
            _ => return None,
        }
        let mut integer = true;
        if b.get(at) == Some(&b'.') {
            at += 1;
            integer = false;
            if !digits(&mut at) {
                return None;
            }
        }
        if matches!(b.get(at), Some(b'e' | b'E')) {
            at += 1;
            integer = false;
            if matches!(b.get(at), Some(b'+' | b'-')) {
                at += 1;
            }
            if !digits(&mut at) {
                return None;
            }
        }
        self.at = at;
        // SAFETY: the bytes were checked above to be `-`, `+`, `.`, `e`, `E` or digits: ASCII.
        Some((unsafe { std::str::from_utf8_unchecked(&b[start..at]) }, integer))
    }

    /// A column's value into it, as serde_json's tier takes it ([`Value`], and a decimal's raw
    /// text).
    fn value(&mut self, col: &mut Col, required: bool) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.at += 1;
                col.append_str(self.string()?)
            }
            b'n' => {
                self.literal("null")?;
                (!required).then(|| col.append_null())
            }
            b't' | b'f' => {
                let v = self.peek()? == b't';
                self.literal(if v { "true" } else { "false" })?;
                match col {
                    Col::Bool(b) => {
                        b.append_value(v);
                        Some(())
                    }
                    _ => None,
                }
            }
            b'-' | b'0'..=b'9' => {
                let (text, integer) = self.number()?;
                if let Col::Decimal(..) = col {
                    return col.append_str(text);
                }
                // serde_json hands over the integers that fit an i64 (negative, but not `-0`,
                // which it reads as a float) or a u64; anything else is a float, left to arrow.
                if !integer || text.len() > 20 || text == "-0" {
                    return None;
                }
                // At most 20 digits, checked by `number`: no overflow.
                let (negative, digits) = text.strip_prefix('-').map_or((false, text), |d| (true, d));
                let v = digits.bytes().fold(0i128, |v, c| v * 10 + i128::from(c - b'0'));
                let v = if negative { -v } else { v };
                if v < i128::from(i64::MIN) || v > i128::from(u64::MAX) {
                    return None;
                }
                col.append_int(v)
            }
            _ => None,
        }
    }

    /// The value of a field no column takes: checked, as serde_json checks it, when it is a
    /// scalar; an object or array is left to serde_json's tier.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.at += 1;
                self.string().map(drop)
            }
            b'n' => self.literal("null"),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'-' | b'0'..=b'9' => self.number().map(drop),
            _ => None,
        }
    }
}

/// Where the string starting at `from` stops: the index of the first quote, backslash or
/// control character (below 0x20) at or after `from`, and whether every byte before it is
/// ASCII. `None` when there is none.
fn string_end(b: &[u8], from: usize) -> Option<(usize, bool)> {
    #[cfg(target_arch = "x86_64")]
    return string_end_sse2(b, from);
    #[cfg(not(target_arch = "x86_64"))]
    return string_end_swar(b, from);
}

/// [`string_end`] sixteen bytes at a time (SSE2 is part of every x86_64 CPU).
#[cfg(target_arch = "x86_64")]
fn string_end_sse2(b: &[u8], from: usize) -> Option<(usize, bool)> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let mut at = from;
    let mut high = 0u32;
    while let Some(block) = b.get(at..at + 16) {
        // SAFETY: `block` is 16 readable bytes (an unaligned load), and SSE2 is always there on
        // x86_64.
        let (stops, non_ascii) = unsafe {
            let v = _mm_loadu_si128(block.as_ptr().cast::<__m128i>());
            let special = _mm_or_si128(
                _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)),
                _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)),
            );
            // A signed compare: below 0x20 are the control characters and the bytes from 0x80
            // (negative), told apart by their high bit.
            let below = _mm_movemask_epi8(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20))) as u32;
            let high = _mm_movemask_epi8(v) as u32;
            (_mm_movemask_epi8(special) as u32 | (below & !high), high)
        };
        if stops != 0 {
            let n = stops.trailing_zeros();
            high |= non_ascii & ((1 << n) - 1);
            return Some((at + n as usize, high == 0));
        }
        high |= non_ascii;
        at += 16;
    }
    string_end_bytewise(b, at).map(|(end, ascii)| (end, ascii && high == 0))
}

/// [`string_end`] eight bytes at a time, in plain integer arithmetic.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn string_end_swar(b: &[u8], from: usize) -> Option<(usize, bool)> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let mut at = from;
    let mut high = 0u64;
    while let Some(word) = b.get(at..at + 8) {
        let v = u64::from_le_bytes(word.try_into().ok()?);
        let (quote, backslash) = (v ^ (ONES * u64::from(b'"')), v ^ (ONES * u64::from(b'\\')));
        // A byte's high bit is set where it is zero (the quote or backslash) or below 0x20 and
        // not from 0x80; the lowest byte flagged is always a true one.
        let hits = ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (v.wrapping_sub(ONES * 0x20) & !v))
            & HIGH;
        if hits != 0 {
            let n = hits.trailing_zeros() / 8;
            // The high bits of the bytes before the stop.
            high |= v & HIGH & ((1u64 << (n * 8)) - 1);
            return Some((at + n as usize, high == 0));
        }
        high |= v & HIGH;
        at += 8;
    }
    string_end_bytewise(b, at).map(|(end, ascii)| (end, ascii && high == 0))
}

/// [`string_end`] one byte at a time: the tail shorter than a block.
fn string_end_bytewise(b: &[u8], from: usize) -> Option<(usize, bool)> {
    let n = b[from..].iter().position(|c| matches!(c, b'"' | b'\\' | 0..=0x1f))?;
    Some((from + n, b[from..from + n].is_ascii()))
}

/// Why the fast path gave up; never shown (arrow-json decodes the chunk and says what is wrong).
fn give_up<E: de::Error>() -> E {
    E::custom("outside the fast path")
}

/// One JSON object into one row of every column: the bits of the columns it had.
struct Record<'a> {
    fast: &'a FastJson,
    cols: &'a mut [Col],
}

impl<'de> DeserializeSeed<'de> for Record<'_> {
    type Value = u64;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Record<'_> {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut seen = 0u64;
        let mut hint = 0;
        while let Some(key) = map.next_key_seed(Key)? {
            match self.fast.column(key, hint) {
                Some(i) => {
                    if seen & (1 << i) != 0 {
                        return Err(give_up());
                    }
                    seen |= 1 << i;
                    hint = i + 1;
                    let required = self.fast.required & (1 << i) != 0;
                    let col = &mut self.cols[i];
                    if let Col::Decimal(..) = col {
                        // serde_json would hand over a number with a fraction as an f64; a
                        // decimal needs its digits, as arrow-json reads them.
                        let raw: &'de RawValue = map.next_value()?;
                        col.append_raw_decimal(raw.get(), required).ok_or_else(give_up)?;
                    } else {
                        map.next_value_seed(Value { col, required })?;
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(seen)
    }
}

/// A key as it is in the input; an escaped one is left to arrow-json.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = &'de [u8];
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<&'de [u8], D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = &'de [u8];

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key without escapes")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<&'de [u8], E> {
        Ok(v.as_bytes())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<&'de [u8], E> {
        Err(give_up())
    }
}

/// One value into its column.
struct Value<'a> {
    col: &'a mut Col,
    required: bool,
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON scalar of the column's type")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if self.required {
            return Err(give_up());
        }
        self.col.append_null();
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.col {
            Col::Bool(b) => {
                b.append_value(v);
                Ok(())
            }
            _ => Err(give_up()),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.col.append_int(i128::from(v)).ok_or_else(give_up)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.col.append_int(i128::from(v)).ok_or_else(give_up)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.col.append_str(v).ok_or_else(give_up)
    }
}

/// `-?DIGITS(.DIGITS)?` with at most `scale` fractional digits, as the unscaled value, when it
/// fits `precision`: what arrow's `parse_decimal` gives for it. Anything else is left to arrow.
fn parse_decimal(s: &str, precision: u8, scale: u8) -> Option<i128> {
    let b = s.as_bytes();
    let (negative, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    let (int, frac) = match digits.iter().position(|c| *c == b'.') {
        Some(i) => (&digits[..i], &digits[i + 1..]),
        None => (digits, &digits[digits.len()..]),
    };
    let has_point = int.len() < digits.len();
    if int.is_empty() || (has_point && frac.is_empty()) || frac.len() > usize::from(scale) {
        return None;
    }
    if !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return None;
    }
    // arrow counts the significant digits of the scaled value against the precision.
    let int = &int[int.iter().position(|c| *c != b'0').unwrap_or(int.len())..];
    if int.len() + usize::from(scale) > usize::from(precision) {
        return None;
    }
    let mut v: i128 = 0;
    for c in int.iter().chain(frac) {
        v = v * 10 + i128::from(c - b'0');
    }
    v *= 10i128.pow(u32::from(scale) - frac.len() as u32);
    Some(if negative { -v } else { v })
}

/// Days since 1970-01-01 of `YYYY-MM-DD` (years 1 to 9999, a real day of the month).
fn parse_date(b: &[u8]) -> Option<i64> {
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if year == 0 || !(1..=12).contains(&month) || day == 0 || day > month_days[month as usize - 1] {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Microseconds since the epoch of `YYYY-MM-DD`, or of `YYYY-MM-DD[T t space]HH:MM:SS`, with
/// 1 to 9 fractional digits and a `Z` optional, read as UTC (arrow reads a timestamp without a
/// zone as UTC, and sluice's `timestamptz` columns are UTC).
fn parse_timestamp_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let days = parse_date(b)?;
    if b.len() == 10 {
        return days.checked_mul(86_400_000_000);
    }
    if b.len() < 19 || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, m, sec) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if h > 23 || m > 59 || sec > 59 {
        return None;
    }
    let mut rest = &b[19..];
    if let Some(r) = rest.strip_suffix(b"Z").or_else(|| rest.strip_suffix(b"z")) {
        rest = r;
    }
    let mut nanos = 0i64;
    if let Some(frac) = rest.strip_prefix(b".") {
        if frac.is_empty() || frac.len() > 9 {
            return None;
        }
        nanos = digits(frac)? * 10i64.pow(9 - frac.len() as u32);
    } else if !rest.is_empty() {
        return None;
    }
    let secs = days * 86_400 + h * 3_600 + m * 60 + sec;
    secs.checked_mul(1_000_000)?.checked_add(nanos / 1_000)
}

/// Whether two keys are equal, compared eight bytes at a time in place: a call to `memcmp` per
/// key was 7% of a file pipeline's CPU, keys being a few bytes long.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]));
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    a8.by_ref().zip(b8.by_ref()).all(|(x, y)| word(x) == word(y))
        && a8.remainder().iter().zip(b8.remainder()).all(|(x, y)| x == y)
}

/// `bytes` as text for serde_json's tier, checked first for what arrow-json rejects in every
/// string, also in the fields it ignores, where serde_json does not look (it checks only what it
/// keeps): invalid UTF-8 and unpaired surrogate escapes. The scanner needs neither: it checks
/// every string's UTF-8 itself and takes no escape.
fn checked_text(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    (!has_unpaired_surrogate(bytes)).then_some(text)
}

/// Whether some `\uD800`–`\uDFFF` escape is not one half of a high-low pair.
fn has_unpaired_surrogate(b: &[u8]) -> bool {
    let hex4 = |i: usize| -> Option<u16> {
        let h = std::str::from_utf8(b.get(i..i + 4)?).ok()?;
        u16::from_str_radix(h, 16).ok()
    };
    // `\u` escapes only after an even number of backslashes (`\\u` is a backslash, then `u`).
    let escapes = |at: usize| b[..at].iter().rev().take_while(|c| **c == b'\\').count() % 2 == 0;
    let mut paired_low = usize::MAX;
    for at in memchr::memmem::find_iter(b, b"\\u") {
        if !escapes(at) {
            continue;
        }
        match hex4(at + 2) {
            Some(0xD800..=0xDBFF) => {
                if b.get(at + 6..at + 8) != Some(&b"\\u"[..]) || !matches!(hex4(at + 8), Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                paired_low = at + 6;
            }
            Some(0xDC00..=0xDFFF) if at != paired_low => return true,
            _ => {}
        }
    }
    false
}

fn digits(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |v, c| c.is_ascii_digit().then(|| v * 10 + i64::from(c - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::types::schema_from_columns;
    use crate::format::{json::JsonDecoder, ChunkDecoder};
    use indexmap::IndexMap;

    fn schema(cols: &[(&str, &str)]) -> SchemaRef {
        let cols: IndexMap<String, String> = cols.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        schema_from_columns(&cols).unwrap()
    }

    fn orders() -> SchemaRef {
        schema(&[
            ("order_id", "bigint not null"),
            ("customer_id", "varchar not null"),
            ("amount", "decimal(12,2)"),
            ("quantity", "int"),
            ("small", "smallint"),
            ("tiny", "tinyint"),
            ("ratio", "double"),
            ("paid", "boolean"),
            ("ts", "timestamp"),
            ("tz", "timestamptz"),
            ("day", "date"),
            ("note", "text"),
        ])
    }

    /// What arrow-json alone makes of `text` (`rows` records), as the decoder did before.
    fn arrow(schema: &SchemaRef, text: impl AsRef<[u8]>, rows: usize) -> Option<RecordBatch> {
        JsonDecoder::arrow_only(schema.clone()).decode(text.as_ref(), rows).ok()
    }

    /// What each tier alone makes of `text`: the scanner's batch, then serde_json's.
    fn tiers(fast: &FastJson, text: impl AsRef<[u8]>, rows: usize) -> [Option<RecordBatch>; 2] {
        let bytes = text.as_ref();
        let scan = fast.scan(bytes, rows).and_then(|c| fast.batch(c));
        let parse = checked_text(bytes).and_then(|text| fast.parse(text, rows)).and_then(|c| fast.batch(c));
        [scan, parse]
    }

    /// Lines the fast path must take, each with what it must not change.
    const PLAIN: &[&str] = &[
        r#"{"order_id":1,"customer_id":"C0116739","amount":"420.05","quantity":5,"ts":"2026-09-21T14:13:20.037","note":"xx"}"#,
        r#"{"order_id":-9223372036854775808,"customer_id":"Zoë \"q\" \\ \n \u00e9 \ud83d\ude00","amount":"-0.5"}"#,
        r#" { "note" : null , "customer_id" : "", "order_id" : 9223372036854775807 , "extra": {"a": [1, {"b": null}], "c": 1e400} } "#,
        r#"{"order_id":2,"customer_id":"c","amount":"0.05","small":-32768,"tiny":127,"ratio":3,"paid":true}"#,
        r#"{"order_id":3,"customer_id":"c","amount":7,"ratio":-9007199254740992,"paid":false,"day":"2024-02-29"}"#,
        r#"{"order_id":4,"customer_id":"c","amount":"0000000000000000000000000000000000000000001.10"}"#,
        r#"{"order_id":5,"customer_id":"c","amount":"9999999999.99","ts":"1969-12-31 23:59:59.999999999"}"#,
        r#"{"order_id":6,"customer_id":"c","amount":"-0","ts":"0001-01-01T00:00:00Z","tz":"2026-09-21t14:13:20.5z"}"#,
        r#"{"order_id":7,"customer_id":"c","ts":"9999-12-31","tz":"2000-01-01 00:00:00.123456","day":"1970-01-01"}"#,
        r#"{"order_id":8,"customer_id":"c","amount":null,"quantity":null,"ratio":null,"paid":null,"ts":null}"#,
        r#"{"order_id":10,"customer_id":"c","amount":83.28,"ratio":2}"#,
        r#"{"order_id":11,"customer_id":"c","amount":-0.5}"#,
        r#"{"order_id":12,"customer_id":"c","amount":-0}"#,
        r#"{"order_id":9,"customer_id":"\\ud800","x":"\ud83d\ude00 \\\ud83d\ude00 \\ude00 \u00e9","y":"\\\\udc00"}"#,
    ];

    /// Lines the fast path must leave to arrow-json (whatever arrow then makes of them).
    const LEFT: &[&str] = &[
        r#"{"order_id":1,"customer_id":"c","amount":"1.5e3"}"#,
        r#"{"order_id":1,"customer_id":"c","amount":1.5e3}"#,
        r#"{"order_id":1,"customer_id":"c","amount":1.234}"#,
        r#"{"order_id":1,"customer_id":"c","amount":"\u0031"}"#,
        r#"{"order_id":1,"customer_id":"c","amount":true}"#,
        r#"{"order_id":1,"customer_id":"c","amount":"1.234"}"#,
        r#"{"order_id":1,"customer_id":"c","amount":"1."}"#,
        r#"{"order_id":1,"customer_id":"c","amount":".5"}"#,
        r#"{"order_id":1,"customer_id":"c","amount":"+5"}"#,
        r#"{"order_id":1,"customer_id":"c","amount":"12345678901.00"}"#,
        r#"{"order_id":1,"customer_id":"c","amount":100000000000}"#,
        r#"{"order_id":1,"customer_id":"c","quantity":2147483648}"#,
        r#"{"order_id":1,"customer_id":"c","quantity":"5"}"#,
        r#"{"order_id":1,"customer_id":"c","quantity":5.0}"#,
        r#"{"order_id":9223372036854775808,"customer_id":"c"}"#,
        r#"{"order_id":1,"customer_id":"c","ratio":0}"#,
        r#"{"order_id":1,"customer_id":"c","ratio":-0}"#,
        r#"{"order_id":1,"customer_id":"c","ratio":0.1}"#,
        r#"{"order_id":1,"customer_id":"c","ratio":9007199254740993}"#,
        r#"{"order_id":1,"customer_id":"c","paid":"true"}"#,
        r#"{"order_id":1,"customer_id":"c","paid":1}"#,
        r#"{"order_id":1,"customer_id":5}"#,
        r#"{"order_id":1,"customer_id":"c","note":["a"]}"#,
        r#"{"order_id":1,"customer_id":"c","ts":"2026-09-21T14:13:20+02:00"}"#,
        r#"{"order_id":1,"customer_id":"c","ts":"2026-09-21T14:13"}"#,
        r#"{"order_id":1,"customer_id":"c","ts":"2026-09-21T14:13:20.1234567890"}"#,
        r#"{"order_id":1,"customer_id":"c","ts":"2026-02-30T00:00:00"}"#,
        r#"{"order_id":1,"customer_id":"c","ts":"2026-09-21T24:00:00"}"#,
        r#"{"order_id":1,"customer_id":"c","ts":"2016-12-31T23:59:60"}"#,
        r#"{"order_id":1,"customer_id":"c","ts":1790000000000000}"#,
        r#"{"order_id":1,"customer_id":"c","day":"2026-9-21"}"#,
        r#"{"order_id":1,"customer_id":"c","day":"2026-09-21T00:00:00"}"#,
        r#"{"order_id":1,"customer_id":"c","order_id":2}"#,
        r#"{"order_id":1,"customer_\u0069d":"c"}"#,
        r#"{"order_id":1}"#,
        r#"{"order_id":null,"customer_id":"c"}"#,
        r#"{"order_id":1,"customer_id":"c""#,
        r#"{"order_id":1,"customer_id":"c"} x"#,
        r#"{"order_id":1,"customer_id":"c"}{"order_id":2,"customer_id":"c"}"#,
        r#"[1]"#,
        r#"null"#,
        r#""#,
        r#"{"order_id":1,"customer_id":"c","extra":[1,]}"#,
        r#"{"order_id":1,"customer_id":"\ud800"}"#,
        r#"{"order_id":1,"customer_id":"c","extra":"\ud800"}"#,
        r#"{"order_id":1,"customer_id":"c","extra":"\ude00"}"#,
        r#"{"order_id":1,"customer_id":"c","extra":"\ud83d\u0041"}"#,
        r#"{"order_id":1,"customer_id":"c","extra":"\\\ude00"}"#,
        r#"{"order_id":1,"customer_id":"c","extra":"\\ud83d\ude00"}"#,
    ];

    #[test]
    fn what_the_fast_path_takes_equals_arrow_json() {
        let s = orders();
        let fast = FastJson::new(&s).expect("every column type of the test schema is on the fast path");
        let mut scanned = 0;
        for line in PLAIN {
            let got = fast.decode(line.as_bytes(), 1).unwrap_or_else(|| panic!("left to arrow: {line}"));
            assert_eq!(Some(got), arrow(&s, line, 1), "{line}");
            // Each tier alone, where it takes the line, makes the same batch.
            let [scan, parse] = tiers(&fast, line, 1);
            assert!(parse.is_some(), "serde_json's tier takes every plain line: {line}");
            if scan.is_some() {
                scanned += 1;
                assert_eq!(scan, parse, "{line}");
            }
            // The scanner leaves escapes and nested values to serde_json.
            assert_eq!(scan.is_none(), line.contains('\\') || line.contains('['), "{line}");
        }
        assert!(scanned >= PLAIN.len() / 2, "the scanner took {scanned} of {} lines", PLAIN.len());
        let all = PLAIN.join("\n");
        let got = fast.decode(all.as_bytes(), PLAIN.len()).expect("the whole chunk");
        assert_eq!(Some(got), arrow(&s, &all, PLAIN.len()));
    }

    #[test]
    fn what_it_leaves_is_left_whole_and_arrow_decides() {
        let s = orders();
        let fast = FastJson::new(&s).unwrap();
        for line in LEFT {
            assert_eq!(fast.decode(line.as_bytes(), 1), None, "{line}");
            // One such record anywhere leaves the whole chunk to arrow.
            let chunk = format!("{}\n{line}\n{}", PLAIN[0], PLAIN[1]);
            assert_eq!(fast.decode(chunk.as_bytes(), 3), None, "{line}");
        }
        // Fewer or more objects than records.
        assert_eq!(fast.decode(PLAIN[0].as_bytes(), 2), None);
        assert_eq!(fast.decode(format!("{}\n{}", PLAIN[0], PLAIN[1]).as_bytes(), 1), None);
    }

    #[test]
    fn the_scanner_stops_at_the_first_quote_escape_or_control_character_wherever_it_is() {
        let s = schema(&[("a", "varchar"), ("b", "bigint")]);
        let fast = FastJson::new(&s).unwrap();
        for len in 0..20 {
            for at in 0..=len {
                // What goes into the string, and whether the scanner may take it.
                for (c, taken) in
                    [("é", true), ("😀", true), ("\u{7f}", true), ("\u{1}", false), ("\u{1f}", false), ("\\n", false)]
                {
                    let mut v = "y".repeat(len);
                    v.insert_str(at, c);
                    let line = format!("{{\"a\":\"{v}\",\"b\":1}} ");
                    let [scan, _] = tiers(&fast, &line, 1);
                    assert_eq!(scan.is_some(), taken, "{line:?}");
                    if taken {
                        assert_eq!(scan, arrow(&s, &line, 1), "{line:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn both_string_scanners_stop_where_a_byte_by_byte_scan_stops() {
        use rand::{Rng, SeedableRng};
        // What a string scanner must say, byte by byte.
        let reference = |b: &[u8], from: usize| {
            let n = b[from..].iter().position(|c| matches!(c, b'"' | b'\\' | 0..=0x1f))?;
            Some((from + n, b[from..from + n].is_ascii()))
        };
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        // Mostly plain letters, now and then a byte the scanners stop at or note.
        let alphabet: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 ";
        let rare: &[u8] = &[b'"', b'\\', 0, 0x1f, 0x20, 0x7f, 0x80, 0x9f, 0xa0, 0xc3, 0xdf, 0xe0, 0xff];
        for _ in 0..20_000 {
            let len = rng.random_range(0..80);
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.random_range(0..40) == 0 {
                        rare[rng.random_range(0..rare.len())]
                    } else {
                        alphabet[rng.random_range(0..alphabet.len())]
                    }
                })
                .collect();
            let from = rng.random_range(0..=len);
            let want = reference(&b, from);
            assert_eq!(string_end_swar(&b, from), want, "{b:?} from {from}");
            #[cfg(target_arch = "x86_64")]
            assert_eq!(string_end_sse2(&b, from), want, "{b:?} from {from}");
        }
    }

    #[test]
    fn the_scanner_takes_only_valid_utf8_wherever_it_is() {
        let s = schema(&[("a", "varchar"), ("b", "bigint")]);
        let fast = FastJson::new(&s).unwrap();
        for len in 0..40 {
            for at in 0..=len {
                for (c, valid) in [
                    (&b"\xc3\xa9"[..], true),
                    (b"\xf0\x9f\x98\x80", true),
                    (b"\xff", false),
                    (b"\xc3", false),
                    (b"\xe2\x82", false),
                    (b"\xed\xa0\x80", false),
                ] {
                    let mut v = vec![b'y'; len];
                    v.splice(at..at, c.iter().copied());
                    // In a column's value and in an ignored field's.
                    for line in [
                        [&b"{\"a\":\""[..], &v, b"\",\"b\":1}"].concat(),
                        [&b"{\"a\":\"x\",\"c\":\""[..], &v, b"\",\"b\":1}"].concat(),
                    ] {
                        let [scan, _] = tiers(&fast, &line, 1);
                        assert_eq!(scan.is_some(), valid, "{line:?}");
                        assert_eq!(fast.decode(&line, 1), arrow(&s, &line, 1), "{line:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_key_is_taken_for_the_next_column_only_when_it_is_that_whole_name() {
        let s = schema(&[("a", "bigint"), ("ab", "bigint"), ("b", "varchar")]);
        let fast = FastJson::new(&s).unwrap();
        for (line, taken) in [
            (r#"{"a":1,"ab":2,"b":"x"}"#, true),
            (r#"{"ab":2,"a":1,"b":"x"}"#, true),
            (r#"{"a":1,"abc":2,"b":"x"}"#, true),
            (r#"{"a" : 1 , "ab" :2}"#, true),
            (r#"{"b":"x","a":1}"#, true),
            (r#"{"":1,"a":1}"#, true),
            (r#"{"a":1,"a":2}"#, false),
            (r#"{"a\u0062":1}"#, false),
            (r#"{"a"#, false),
        ] {
            let got = fast.decode(line.as_bytes(), 1);
            assert_eq!(got.is_some(), taken, "{line}");
            if taken {
                assert_eq!(got, arrow(&s, line, 1), "{line}");
            }
            assert_eq!(tiers(&fast, line, 1)[0].is_some(), taken, "the scanner alone: {line}");
        }
    }

    #[test]
    fn keys_are_equal_only_byte_for_byte() {
        let key = b"customer_id_of_the_order";
        for len in 0..=key.len() {
            let k = &key[..len];
            assert!(same(k, k));
            for at in 0..len {
                let mut other = k.to_vec();
                other[at] ^= 1;
                assert!(!same(k, &other), "{at} of {len}");
            }
            assert!(!same(k, &key[..len.saturating_sub(1)]) || len == 0);
        }
    }

    #[test]
    fn invalid_utf8_anywhere_is_left_to_arrow_json() {
        let s = orders();
        let fast = FastJson::new(&s).unwrap();
        for line in [
            &b"{\"order_id\":1,\"customer_id\":\"c\",\"extra\":\"\xff\"}"[..],
            b"{\"order_id\":1,\"customer_id\":\"\xc3\"}",
        ] {
            assert_eq!(fast.decode(line, 1), None);
            assert_eq!(arrow(&s, line, 1), None, "arrow-json rejects it too");
            let valid = String::from_utf8_lossy(line);
            let got = fast.decode(valid.as_bytes(), 1);
            assert!(got.is_some() && got == arrow(&s, valid.as_bytes(), 1), "made valid, it decodes: {valid}");
        }
    }

    #[test]
    fn schemas_with_other_types_do_not_take_the_fast_path() {
        for ty in ["varchar[]", "bytea", "time", "real", "decimal(10,2)[]"] {
            assert!(FastJson::new(&schema(&[("a", "bigint"), ("b", ty)])).is_none(), "{ty}");
        }
    }

    #[test]
    fn decimals_dates_and_timestamps_read_as_arrow_reads_them() {
        assert_eq!(parse_decimal("420.05", 12, 2), Some(42005));
        assert_eq!(parse_decimal("-7", 3, 2), Some(-700));
        assert_eq!(parse_decimal("10", 3, 2), None, "1000 needs 4 digits");
        assert_eq!(parse_decimal("0.5", 1, 1), Some(5));
        assert_eq!(parse_date(b"1970-01-01"), Some(0));
        assert_eq!(parse_date(b"2000-03-01"), Some(11_017));
        assert_eq!(parse_date(b"1900-02-29"), None);
        assert_eq!(parse_timestamp_micros("1970-01-01T00:00:01.0000019"), Some(1_000_001));
        assert_eq!(parse_timestamp_micros("1969-12-31T23:59:59.5"), Some(-500_000));
    }

    /// Values per column of [`orders`], most plain, some just outside what the fast path takes.
    const VALUES: &[(&str, &[&str])] = &[
        (
            "order_id",
            &[
                "1",
                "-42",
                "0",
                "9223372036854775807",
                "-9223372036854775808",
                "9223372036854775808",
                "-0",
                "1e3",
                "1.0",
                "\"7\"",
                "null",
            ],
        ),
        (
            "customer_id",
            &[
                "\"C1\"",
                "\"\"",
                "\"Zoë\"",
                "\"a\\\"b\"",
                "\"\\u00e9\"",
                "\"\\ud83d\\ude00\"",
                "\"\\ud800\"",
                "\"\\\\ud800\"",
                "5",
                "null",
                "\"tab\\there\"",
            ],
        ),
        (
            "amount",
            &[
                "\"420.05\"",
                "83.28",
                "\"0.05\"",
                "-1.5",
                "1.234",
                "1E2",
                "\"\\u0031\"",
                "7",
                "-3",
                "\"-0\"",
                "\"1.5e3\"",
                "\"1.234\"",
                "1.5",
                "\"9999999999.99\"",
                "\"10000000000.00\"",
                "\"abc\"",
                "null",
                "\"00012.3\"",
                "\"1.\"",
                "100000000000",
            ],
        ),
        ("quantity", &["5", "-2147483648", "2147483647", "2147483648", "\"5\"", "5.0", "null", "true"]),
        ("small", &["-32768", "32767", "32768", "0", "null"]),
        ("tiny", &["127", "-128", "128", "1", "null"]),
        ("ratio", &["3", "-9007199254740992", "9007199254740993", "0", "-0", "0.1", "1e2", "2.5", "null", "\"1\""]),
        ("paid", &["true", "false", "null", "1", "\"true\""]),
        (
            "ts",
            &[
                "\"2026-09-21T14:13:20.037\"",
                "\"1969-12-31 23:59:59.999999999\"",
                "\"2026-09-21\"",
                "\"2026-09-21T14:13:20Z\"",
                "\"2026-09-21T14:13:20+02:00\"",
                "\"2026-02-30T00:00:00\"",
                "\"2026-09-21T14:13\"",
                "1790000000000000",
                "null",
                "\"x\"",
            ],
        ),
        ("tz", &["\"2000-01-01 00:00:00.123456\"", "\"2026-09-21t14:13:20.5z\"", "\"2026-13-01T00:00:00\"", "null"]),
        (
            "day",
            &[
                "\"2024-02-29\"",
                "\"1970-01-01\"",
                "\"2023-02-29\"",
                "\"2026-9-21\"",
                "\"2026-09-21T00:00:00\"",
                "null",
                "3",
            ],
        ),
        ("note", &["\"xx\"", "null", "\"\\\\\"", "[\"a\"]", "{}", "\"é\\n\""]),
    ];

    /// Fields no column has: ignored, but they must still be valid JSON (and valid for arrow-json).
    const EXTRA: &[&str] = &[
        r#""extra":{"a":[1,{"b":null}],"c":1e400}"#,
        r#""x":"\ud83d\ude00""#,
        r#""x":"\ude00""#,
        r#""y":[1,]"#,
        r#""z":-0.0"#,
        r#""order_\u0069d":1"#,
    ];

    /// One random line: a random subset of the columns in random order, plain values mostly,
    /// sometimes an extra field, a repeated key, odd spacing, or a cut.
    fn random_line(rng: &mut impl rand::Rng) -> String {
        let mut fields: Vec<String> = Vec::new();
        for (name, values) in VALUES {
            if rng.random_bool(0.15) && *name != "order_id" && *name != "customer_id" {
                continue;
            }
            // The first two values of each column are plain; the rest only now and then.
            let plain = values.len().min(2);
            let v = if rng.random_bool(0.95) {
                values[rng.random_range(0..plain)]
            } else {
                values[rng.random_range(0..values.len())]
            };
            fields.push(format!("\"{name}\":{v}"));
        }
        if rng.random_bool(0.08) {
            fields.push(EXTRA[rng.random_range(0..EXTRA.len())].to_string());
        }
        if rng.random_bool(0.02) {
            let again = fields[rng.random_range(0..fields.len())].clone();
            fields.push(again);
        }
        if rng.random_bool(0.5) {
            let n = fields.len();
            fields.swap(rng.random_range(0..n), rng.random_range(0..n));
        }
        let sep = if rng.random_bool(0.1) { " , " } else { "," };
        let mut line = format!("{{{}}}", fields.join(sep));
        if rng.random_bool(0.01) {
            line.truncate(rng.random_range(0..line.len()));
        }
        line
    }

    #[test]
    fn random_records_decode_as_arrow_json_decodes_them() {
        use crate::format::{decode_chunk, LineChunk};
        use rand::SeedableRng;

        let s = orders();
        let fast = FastJson::new(&s).unwrap();
        let with_fast = JsonDecoder::always_fast(s.clone());
        let arrow_only = JsonDecoder::arrow_only(s.clone());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(20261204);
        let (mut taken, mut scanned, mut lines) = (0, 0, 0);
        for _ in 0..200 {
            let mut chunk = LineChunk::new();
            for i in 0..50u64 {
                let line = random_line(&mut rng);
                if let Some(got) = fast.decode(line.as_bytes(), 1) {
                    assert_eq!(Some(got), arrow(&s, &line, 1), "{line}");
                    taken += 1;
                }
                let [scan, parse] = tiers(&fast, &line, 1);
                if scan.is_some() {
                    assert_eq!(scan, arrow(&s, &line, 1), "the scanner: {line}");
                    scanned += 1;
                }
                if parse.is_some() {
                    assert_eq!(parse, arrow(&s, &line, 1), "serde_json's tier: {line}");
                }
                lines += 1;
                chunk.push(line.as_bytes(), i);
            }
            let a = decode_chunk(&with_fast, &chunk).unwrap();
            let b = decode_chunk(&arrow_only, &chunk).unwrap();
            assert_eq!(a.batch, b.batch);
            assert_eq!(a.positions, b.positions);
            let bad = |d: &crate::format::Decoded| {
                d.bad.iter().map(|r| (r.position, r.stage, r.error.clone())).collect::<Vec<_>>()
            };
            assert_eq!(bad(&a), bad(&b));
        }
        // The test means something only if both ways are exercised.
        assert!(taken > lines / 5 && taken < lines, "fast path took {taken} of {lines} lines");
        assert!(scanned > lines / 10 && scanned < taken, "the scanner took {scanned} of {lines} lines");
    }
}
