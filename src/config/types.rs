//! Typed configuration values: byte sizes (`"128MiB"`), durations (`"60s"`) and SQL column types.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use indexmap::IndexMap;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A size in bytes, written as an integer or as a string with a unit: `"512MiB"`, `"64 KB"`, `"1G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"128MiB"`, `"1.5GB"`, `"4096"`. Decimal (KB, MB, GB) and binary (KiB, MiB, GiB)
    /// units are both accepted; a bare `K`/`M`/`G` is binary.
    ///
    /// # Errors
    /// A message saying what was wrong with the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .replace('_', "")
            .parse()
            .map_err(|_| "not a size; write e.g. \"128MiB\", \"64KB\" or a number of bytes".to_string())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}`; use B, KB, MB, GB, KiB, MiB or GiB")),
        };
        Ok(ByteSize((num * mult as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"128MiB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `"60s"`, `"5m"`, `"250ms"` or `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| de::Error::custom(format!("not a duration ({e}); write e.g. \"60s\", \"5m\" or \"250ms\"")))
    }
}

/// A column type written with SQL type names, nullable unless it ends in `not null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    pub data_type: DataType,
    pub nullable: bool,
}

/// The SQL type names a schema may use, for error messages and docs.
pub const SQL_TYPE_NAMES: &str = "boolean, tinyint, smallint, int, bigint, real, double, decimal(p,s), \
varchar/text, bytea, date, time, timestamp, timestamptz, and arrays of any of them as `T[]`";

impl ColumnType {
    /// Parses `"bigint not null"`, `"decimal(12,2)"`, `"varchar[]"`, `"timestamp with time zone"`.
    ///
    /// # Errors
    /// A message naming the type that is not understood and listing the ones that are.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let collapsed: String = lower.split_whitespace().collect::<Vec<_>>().join(" ");
        let (ty, nullable) = match collapsed.strip_suffix(" not null") {
            Some(t) => (t.trim(), false),
            None => match collapsed.strip_suffix(" null") {
                Some(t) => (t.trim(), true),
                None => (collapsed.as_str(), true),
            },
        };
        let data_type = parse_data_type(ty)
            .ok_or_else(|| format!("unknown column type `{}`; use one of: {SQL_TYPE_NAMES}", text.trim()))?;
        Ok(ColumnType { data_type, nullable })
    }
}

fn parse_data_type(ty: &str) -> Option<DataType> {
    if let Some(inner) = ty.strip_suffix("[]") {
        let item = parse_data_type(inner.trim())?;
        return Some(DataType::List(Arc::new(Field::new("item", item, true))));
    }
    if let Some(args) = ty.strip_prefix("decimal").or_else(|| ty.strip_prefix("numeric")) {
        let args = args.trim();
        if args.is_empty() {
            return Some(DataType::Decimal128(38, 10));
        }
        let inner = args.strip_prefix('(')?.strip_suffix(')')?;
        let mut parts = inner.split(',').map(str::trim);
        let precision: u8 = parts.next()?.parse().ok()?;
        let scale: i8 = match parts.next() {
            Some(s) => s.parse().ok()?,
            None => 0,
        };
        if parts.next().is_some() || precision == 0 || precision > 38 || scale < 0 || scale as u8 > precision {
            return None;
        }
        return Some(DataType::Decimal128(precision, scale));
    }
    if let Some(args) = ty.strip_prefix("varchar(").or_else(|| ty.strip_prefix("char(")) {
        args.strip_suffix(')')?.trim().parse::<u32>().ok()?;
        return Some(DataType::Utf8);
    }
    Some(match ty {
        "boolean" | "bool" => DataType::Boolean,
        "tinyint" | "int1" => DataType::Int8,
        "smallint" | "int2" => DataType::Int16,
        "int" | "integer" | "int4" => DataType::Int32,
        "bigint" | "int8" | "long" => DataType::Int64,
        "real" | "float4" => DataType::Float32,
        "double" | "double precision" | "float8" | "float" => DataType::Float64,
        "varchar" | "text" | "string" | "char" | "character varying" | "json" | "uuid" => DataType::Utf8,
        "bytea" | "binary" | "varbinary" | "blob" | "bytes" => DataType::Binary,
        "date" => DataType::Date32,
        "time" => DataType::Time64(TimeUnit::Microsecond),
        "timestamp" | "timestamp without time zone" | "datetime" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamptz" | "timestamp with time zone" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => return None,
    })
}

/// Builds an Arrow schema from `name = "sql type"` pairs, in the order written.
///
/// # Errors
/// `(column, message)` for the first column whose type does not parse.
pub fn schema_from_columns(columns: &IndexMap<String, String>) -> Result<SchemaRef, (String, String)> {
    let mut fields = Vec::with_capacity(columns.len());
    for (name, ty) in columns {
        let t = ColumnType::parse(ty).map_err(|m| (name.clone(), m))?;
        fields.push(Field::new(name, t.data_type, t.nullable));
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// Renders an Arrow type with the SQL name a user would write in a schema.
pub fn sql_type_name(dt: &DataType) -> String {
    match dt {
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "varchar".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "bytea".into(),
        DataType::Date32 => "date".into(),
        DataType::Time64(_) => "time".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::List(f) | DataType::LargeList(f) => format!("{}[]", sql_type_name(f.data_type())),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_units() {
        assert_eq!(ByteSize::parse("128MiB").unwrap(), ByteSize(128 << 20));
        assert_eq!(ByteSize::parse("64 KB").unwrap(), ByteSize(64_000));
        assert_eq!(ByteSize::parse("1_000").unwrap(), ByteSize(1000));
        assert_eq!(ByteSize::parse("1.5G").unwrap(), ByteSize(3 << 29));
        assert!(ByteSize::parse("12 parsecs").unwrap_err().contains("unknown size unit"));
        assert!(ByteSize::parse("lots").is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
    }

    #[test]
    fn parses_sql_types_and_nullability() {
        let t = ColumnType::parse("bigint not null").unwrap();
        assert_eq!((t.data_type, t.nullable), (DataType::Int64, false));
        let t = ColumnType::parse("decimal(12,2)").unwrap();
        assert_eq!((t.data_type, t.nullable), (DataType::Decimal128(12, 2), true));
        let t = ColumnType::parse("VARCHAR[]").unwrap();
        assert_eq!(t.data_type, DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))));
        let t = ColumnType::parse("timestamp  with time zone NOT NULL").unwrap();
        assert_eq!(t.data_type, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())));
        assert!(!t.nullable);
        assert!(ColumnType::parse("decimal(40,2)").is_err());
        assert!(ColumnType::parse("decimal(5,6)").is_err());
        let err = ColumnType::parse("bigintt").unwrap_err();
        assert!(err.contains("unknown column type `bigintt`"), "{err}");
    }

    #[test]
    fn type_names_round_trip() {
        for t in ["bigint", "decimal(12,2)", "varchar[]", "timestamp", "timestamptz", "date", "boolean"] {
            assert_eq!(sql_type_name(&ColumnType::parse(t).unwrap().data_type), t);
        }
    }
}
