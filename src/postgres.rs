//! PostgreSQL plumbing shared by the `postgres` source and sink: connection settings (URL, TLS), a
//! connection pool, identifier quoting, error text and classes, and the binary wire formats of the
//! types sluice maps to and from Arrow.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Deserialize;
use tokio_postgres::error::SqlState;

/// Connection settings, the same for the source and the sink.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file with the CA certificates that sign the server's certificate (added to the
    /// system's roots). TLS itself is asked for in the URL: `?sslmode=require` (or `prefer`).
    pub ca_file: Option<String>,
}

/// Pool size when nothing says otherwise.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// How long to wait for a connection.
/// Prefix of every `CREATE TABLE IF NOT EXISTS` sluice runs: PostgreSQL's `IF NOT EXISTS` is not
/// safe against a concurrent creation (two sinks or workers starting at once fail with a unique
/// violation on `pg_type`), so creations take one transaction-scoped advisory lock first. Sent in
/// the same simple query as the DDL, which makes them one implicit transaction.
pub const DDL_LOCK: &str = "SELECT pg_advisory_xact_lock(5318008135);";

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the bookkeeping table `table` (a quoted name) with `columns` (the CREATE TABLE body), and
/// adds `added` (`name type`, a column later versions introduced) to one made before it, under
/// [`DDL_LOCK`]. Only when the table or that column is missing: ALTER TABLE takes the table's
/// ACCESS EXCLUSIVE lock even when there is nothing to add, so it would wait for every open
/// transaction on the table (another component's write in flight, a stuck client), and everything
/// else on the table would queue behind it.
///
/// # Errors
/// The server's error.
pub async fn ensure_table(
    client: &tokio_postgres::Client,
    table: &str,
    columns: &str,
    added: &str,
) -> Result<(), tokio_postgres::Error> {
    let column = added.split_whitespace().next().unwrap_or_default();
    let ready: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1::text) \
             AND attname = $2::text AND NOT attisdropped)",
            &[&table, &column],
        )
        .await?
        .get(0);
    if ready {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "{DDL_LOCK} CREATE TABLE IF NOT EXISTS {table} ({columns}); ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {added}"
        ))
        .await
}

/// Parses `url` (a `postgres://` URL or a `key=value` string) without ever echoing it: the message
/// names the problem only, as the URL holds the password.
///
/// # Errors
/// A message fit for the `url` key.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        // The parser's own message can quote the input; keep only its kind.
        let kind = e.to_string();
        let kind = kind.split(':').next().unwrap_or("invalid").trim().to_string();
        format!("not a valid PostgreSQL URL ({kind}); expected postgres://user:password@host:5432/database")
    })?;
    if config.get_hosts().is_empty() {
        return Err("the URL names no host; expected postgres://user:password@host:5432/database".into());
    }
    // TLS only when asked for (libpq's default, `prefer`, would fail on a server whose
    // certificate does not verify, since sluice always verifies it).
    if !url.contains("sslmode") {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("sluice");
    }
    Ok(config)
}

/// `host:port/database` of a config, for messages (never the user or password).
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("(default)"))
}

/// A pool of up to `size` connections, opened lazily (building one connects nothing).
///
/// # Errors
/// An unreadable `ca_file`.
pub fn pool(config: tokio_postgres::Config, tls: &TlsSettings, size: usize) -> Result<Pool, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &tls.ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read the CA file `{path}`: {e}"))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("cannot read the CA file `{path}`: {e}"))?;
            roots.add(cert).map_err(|e| format!("the CA file `{path}` holds an unusable certificate: {e}"))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client);
    let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT))
        .wait_timeout(Some(Duration::from_secs(120)))
        .build()
        .map_err(|e| format!("cannot create the connection pool: {e}"))
}

/// The text of a pool error (the server's message, not the URL).
pub fn pool_error(e: &deadpool_postgres::PoolError, target: &str) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => format!("cannot connect to PostgreSQL at {target}: {}", message(e)),
        deadpool_postgres::PoolError::Timeout(_) => {
            format!("cannot connect to PostgreSQL at {target}: timed out (is the server up and reachable?)")
        }
        other => format!("cannot connect to PostgreSQL at {target}: {other}"),
    }
}

/// The server's message with its detail and hint, or the client error.
pub fn message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            m.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            m.push_str(&format!("; hint: {h}"));
        }
        if let Some(c) = db.column() {
            m.push_str(&format!("; column: {c}"));
        }
        return m;
    }
    let mut m = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

/// Errors worth retrying on a fresh connection: lost connections, server restarts, serialization
/// failures and deadlocks, too many connections.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::QUERY_CANCELED
        }
        // No SQLSTATE: an I/O error or a closed connection.
        None => true,
    }
}

/// Errors tied to the data of some rows (a constraint, a value out of range): the rows at fault
/// are found and dead-lettered, the rest is written.
pub fn is_row_error(e: &tokio_postgres::Error) -> bool {
    // Not 22P03/22P04 (a malformed binary value or COPY stream): that is sluice's fault, for
    // every row alike, and fails the pipeline instead of dead-lettering each row.
    e.code().is_some_and(|c| {
        let c = c.code();
        (c.starts_with("23") || c.starts_with("22")) && c != "22P03" && c != "22P04"
    })
}

/// Backoff before retry `attempt` (1-based): 100 ms doubling to 10 s, with full jitter.
pub fn backoff(attempt: u32) -> Duration {
    let cap = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    // Jitter from the clock's nanoseconds: enough to spread retries of several workers.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    Duration::from_millis(cap / 2 + u64::from(nanos) % (cap / 2 + 1))
}

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table` (each part quoted) from a user's `table` setting: `orders`, `public.orders`, or
/// already quoted parts (`"My Table"`).
///
/// # Errors
/// An empty name or more than two parts.
pub fn quote_table(table: &str) -> Result<(Option<String>, String, String), String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = table.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c if quoted => cur.push(c),
            c => cur.push(c.to_ascii_lowercase()),
        }
    }
    parts.push(cur);
    if quoted || parts.iter().any(String::is_empty) || parts.len() > 2 {
        return Err(format!("`{table}` is not a table name; use `table` or `schema.table`"));
    }
    let name = parts.pop().expect("one part at least");
    let schema = parts.pop();
    let full = match &schema {
        Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&name)),
        None => quote_ident(&name),
    };
    Ok((schema, name, full))
}

/// The PostgreSQL types sluice reads and writes, as the server names them (`pg_type.typname`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgKind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(precision, scale)`, or unconstrained (`None`).
    Numeric(Option<(u8, i8)>),
    /// text, varchar, char, name: all UTF-8 text on the wire.
    Text,
    Json,
    Jsonb,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
    Time,
    Uuid,
    /// A one-dimensional array; the element type and its oid (which the wire format carries).
    Array(Box<PgKind>, u32),
}

/// A table or query column as the server describes it.
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: String,
    /// `format_type(...)`, for messages: `numeric(12,2)`, `character varying(20)`.
    pub type_name: String,
    /// `None` when sluice has no mapping for the type.
    pub kind: Option<PgKind>,
    pub not_null: bool,
}

impl PgKind {
    /// From `pg_type.typname` (and the type modifier, for `numeric`); arrays from their element's
    /// name and oid.
    pub fn from_typname(name: &str, typmod: i32, element: Option<(&str, u32)>) -> Option<PgKind> {
        Some(match name {
            "bool" => PgKind::Bool,
            "int2" => PgKind::Int2,
            "int4" => PgKind::Int4,
            "int8" => PgKind::Int8,
            "float4" => PgKind::Float4,
            "float8" => PgKind::Float8,
            "numeric" if typmod >= 4 => {
                let m = typmod - 4;
                // PostgreSQL allows precision up to 1000 and scales of -1000..=1000; Arrow's
                // decimal128 holds 38 digits (larger values are bad records when read).
                let precision = ((m >> 16) & 0xffff).min(38) as u8;
                // The scale is an 11-bit signed field (negative scales since PostgreSQL 15).
                let scale = ((((m & 0x7ff) ^ 1024) - 1024).clamp(-38, 38)) as i8;
                PgKind::Numeric(Some((precision, scale)))
            }
            "numeric" => PgKind::Numeric(None),
            "text" | "varchar" | "bpchar" | "name" | "citext" => PgKind::Text,
            "json" => PgKind::Json,
            "jsonb" => PgKind::Jsonb,
            "bytea" => PgKind::Bytea,
            "date" => PgKind::Date,
            "timestamp" => PgKind::Timestamp,
            "timestamptz" => PgKind::Timestamptz,
            "time" => PgKind::Time,
            "uuid" => PgKind::Uuid,
            n if n.starts_with('_') => {
                let (elem, oid) = element?;
                let kind = PgKind::from_typname(elem, typmod, None)?;
                if matches!(kind, PgKind::Array(..)) {
                    return None;
                }
                PgKind::Array(Box::new(kind), oid)
            }
            _ => return None,
        })
    }

    /// The column type `create_table` gives an Arrow type, or `None` when there is no mapping.
    pub fn sql_for_arrow(dt: &arrow::datatypes::DataType) -> Option<String> {
        use arrow::datatypes::DataType as D;
        Some(match dt {
            D::Boolean => "boolean".into(),
            D::Int8 | D::Int16 | D::UInt8 => "smallint".into(),
            D::Int32 | D::UInt16 => "integer".into(),
            D::Int64 | D::UInt32 => "bigint".into(),
            D::UInt64 => "numeric(20,0)".into(),
            D::Float16 | D::Float32 => "real".into(),
            D::Float64 => "double precision".into(),
            D::Decimal128(p, s) => format!("numeric({p},{s})"),
            D::Utf8 | D::LargeUtf8 | D::Utf8View | D::Null => "text".into(),
            D::Binary | D::LargeBinary | D::BinaryView | D::FixedSizeBinary(_) => "bytea".into(),
            D::Date32 | D::Date64 => "date".into(),
            D::Timestamp(_, None) => "timestamp".into(),
            D::Timestamp(_, Some(_)) => "timestamptz".into(),
            D::Time32(_) | D::Time64(_) => "time".into(),
            D::List(f) | D::LargeList(f) | D::FixedSizeList(f, _) => match f.data_type() {
                D::List(_) | D::LargeList(_) | D::FixedSizeList(..) | D::Struct(_) | D::Map(..) => "jsonb".into(),
                inner => format!("{}[]", PgKind::sql_for_arrow(inner)?),
            },
            D::Struct(_) | D::Map(..) => "jsonb".into(),
            D::Dictionary(_, v) => PgKind::sql_for_arrow(v)?,
            _ => return None,
        })
    }

    /// The Arrow type a column of this kind is read as.
    pub fn arrow_type(&self) -> arrow::datatypes::DataType {
        use arrow::datatypes::{DataType as D, Field, TimeUnit};
        match self {
            PgKind::Bool => D::Boolean,
            PgKind::Int2 => D::Int16,
            PgKind::Int4 => D::Int32,
            PgKind::Int8 => D::Int64,
            PgKind::Float4 => D::Float32,
            PgKind::Float8 => D::Float64,
            // A scale above the precision (numeric(2,5)) widens the precision: Arrow needs s <= p.
            PgKind::Numeric(Some((p, s))) => D::Decimal128((*p).max((*s).max(0) as u8).clamp(1, 38), *s),
            // Unconstrained numeric: 38 digits, 9 of them after the point.
            PgKind::Numeric(None) => D::Decimal128(38, 9),
            PgKind::Text | PgKind::Json | PgKind::Jsonb | PgKind::Uuid => D::Utf8,
            PgKind::Bytea => D::Binary,
            PgKind::Date => D::Date32,
            PgKind::Timestamp => D::Timestamp(TimeUnit::Microsecond, None),
            PgKind::Timestamptz => D::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            PgKind::Time => D::Time64(TimeUnit::Microsecond),
            PgKind::Array(elem, _) => D::List(std::sync::Arc::new(Field::new("item", elem.arrow_type(), true))),
        }
    }
}

/// The columns of `table` (quoted, possibly schema-qualified), in order; `None` when there is no
/// such table.
///
/// # Errors
/// The server's error.
pub async fn table_columns(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Option<Vec<PgColumn>>, tokio_postgres::Error> {
    let exists = client.query_one("SELECT to_regclass($1)::oid", &[&table]).await?;
    let Some(oid) = exists.get::<_, Option<u32>>(0) else { return Ok(None) };
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.atttypmod, a.attnotnull, \
                    format_type(a.atttypid, a.atttypmod), et.typname::text, t.typelem \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| {
                let elem: Option<String> = r.get(5);
                let elem_oid: u32 = r.get(6);
                PgColumn {
                    name: r.get(0),
                    type_name: r.get(4),
                    kind: PgKind::from_typname(r.get(1), r.get(2), elem.as_deref().map(|e| (e, elem_oid))),
                    not_null: r.get(3),
                }
            })
            .collect(),
    ))
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days between the Unix epoch and PostgreSQL's.
pub const PG_EPOCH_DAYS: i32 = 10_957;

/// Binary `numeric` of `unscaled / 10^scale`.
pub fn encode_numeric(unscaled: i128, scale: i8, out: &mut Vec<u8>) {
    let negative = unscaled < 0;
    let digits = unscaled.unsigned_abs().to_string();
    let scale = scale.max(0) as usize;
    let (int_part, frac_part) = if digits.len() > scale {
        (&digits[..digits.len() - scale], digits[digits.len() - scale..].to_string())
    } else {
        ("", format!("{}{}", "0".repeat(scale - digits.len()), digits))
    };
    // Base-10000 groups: the integer part from the right, the fraction from the left.
    let mut groups: Vec<i16> = Vec::new();
    let lead = int_part.len() % 4;
    let mut int_groups = 0i16;
    if lead > 0 {
        groups.push(int_part[..lead].parse().unwrap_or(0));
        int_groups += 1;
    }
    for chunk in int_part.as_bytes()[lead..].chunks(4) {
        groups.push(std::str::from_utf8(chunk).ok().and_then(|s| s.parse().ok()).unwrap_or(0));
        int_groups += 1;
    }
    for chunk in frac_part.as_bytes().chunks(4) {
        let mut s = std::str::from_utf8(chunk).unwrap_or("0").to_string();
        while s.len() < 4 {
            s.push('0');
        }
        groups.push(s.parse().unwrap_or(0));
    }
    let mut weight = int_groups - 1;
    // Strip leading and trailing zero groups.
    let first = groups.iter().position(|g| *g != 0);
    let (ndigits, start) = match first {
        None => (0, 0),
        Some(f) => {
            weight -= f as i16;
            let last = groups.iter().rposition(|g| *g != 0).expect("a non-zero group exists");
            (last + 1 - f, f)
        }
    };
    if ndigits == 0 {
        weight = 0;
    }
    let sign: u16 = if negative && ndigits > 0 { 0x4000 } else { 0 };
    out.extend_from_slice(&((8 + 2 * ndigits) as i32).to_be_bytes());
    out.extend_from_slice(&(ndigits as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(scale as u16).to_be_bytes());
    for g in &groups[start..start + ndigits] {
        out.extend_from_slice(&g.to_be_bytes());
    }
}

/// The unscaled value at `scale` of a binary `numeric`; `Err` for NaN, infinities, values that do not
/// fit 38 digits, or more fractional digits than `scale` (which would round).
pub fn decode_numeric(raw: &[u8], scale: i8) -> Result<i128, String> {
    if raw.len() < 8 {
        return Err("truncated numeric".into());
    }
    let ndigits = i16::from_be_bytes([raw[0], raw[1]]) as usize;
    let weight = i16::from_be_bytes([raw[2], raw[3]]) as i32;
    let sign = u16::from_be_bytes([raw[4], raw[5]]);
    match sign {
        0xC000 => return Err("NaN does not fit a decimal column".into()),
        0xD000 | 0xF000 => return Err("infinity does not fit a decimal column".into()),
        _ => {}
    }
    if raw.len() < 8 + 2 * ndigits {
        return Err("truncated numeric".into());
    }
    let mut value: i128 = 0;
    let scale = i32::from(scale);
    let overflow = || "the value does not fit decimal(38)".to_string();
    for i in 0..ndigits {
        let d = i16::from_be_bytes([raw[8 + 2 * i], raw[9 + 2 * i]]) as i128;
        // This group's place in decimal digits, relative to the scaled unit.
        let exp = 4 * (weight - i as i32) + scale;
        if exp >= 0 {
            let mul = 10i128.checked_pow(exp as u32).ok_or_else(overflow)?;
            value = d.checked_mul(mul).and_then(|v| value.checked_add(v)).ok_or_else(overflow)?;
        } else {
            let drop = (-exp) as u32;
            let whole = if drop >= 4 { d == 0 } else { d % 10i128.pow(drop) == 0 };
            if !whole {
                return Err(format!("the value has more than {scale} fractional digits"));
            }
            if drop < 4 {
                value = value.checked_add(d / 10i128.pow(drop)).ok_or_else(overflow)?;
            }
        }
    }
    if value.unsigned_abs() >= 10u128.pow(38) {
        return Err(overflow());
    }
    Ok(if sign == 0x4000 { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(v: i128, scale: i8) -> i128 {
        let mut buf = Vec::new();
        encode_numeric(v, scale, &mut buf);
        let len = i32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        decode_numeric(&buf[4..], scale).unwrap()
    }

    #[test]
    fn numerics_round_trip() {
        for (v, s) in [
            (0i128, 2i8),
            (1, 0),
            (-1, 0),
            (12345, 2),
            (-12345, 2),
            (10000, 0),
            (100000000, 4),
            (1, 10),
            (-99999999999999999999999999999999999999, 10),
            (99999999999999999999999999999999999999, 0),
            (5, 3),
            (123456789012345678, 9),
        ] {
            assert_eq!(roundtrip(v, s), v, "{v} scale {s}");
        }
    }

    #[test]
    fn numeric_layout_matches_postgres() {
        // SELECT numeric_send(123.45): ndigits 2, weight 0, sign 0, dscale 2, digits 123, 4500.
        let mut buf = Vec::new();
        encode_numeric(12345, 2, &mut buf);
        assert_eq!(&buf[4..], &[0, 2, 0, 0, 0, 0, 0, 2, 0, 123, 0x11, 0x94]);
        // 0.0001: ndigits 1, weight -1, dscale 4, digit 1.
        let mut buf = Vec::new();
        encode_numeric(1, 4, &mut buf);
        assert_eq!(&buf[4..], &[0, 1, 0xff, 0xff, 0, 0, 0, 4, 0, 1]);
    }

    #[test]
    fn numerics_that_do_not_fit_are_errors() {
        // NaN
        assert!(decode_numeric(&[0, 0, 0, 0, 0xC0, 0, 0, 0], 2).is_err());
        // 1.005 at scale 2 would round.
        let mut buf = Vec::new();
        encode_numeric(1005, 3, &mut buf);
        assert!(decode_numeric(&buf[4..], 2).is_err());
        assert_eq!(decode_numeric(&buf[4..], 4).unwrap(), 10050);
    }

    #[test]
    fn every_numeric_typmod_maps_to_a_valid_decimal() {
        for (p, s) in [(1, 0), (12, 2), (38, 10), (1000, 0), (2, 5), (10, -3), (5, 1000), (5, -1000)] {
            let typmod = ((p << 16) | (s & 0x7ff)) + 4;
            let kind = PgKind::from_typname("numeric", typmod, None).unwrap();
            let arrow::datatypes::DataType::Decimal128(ap, as_) = kind.arrow_type() else { panic!() };
            assert!((1..=38).contains(&ap) && i16::from(as_) <= i16::from(ap), "numeric({p},{s}) -> ({ap},{as_})");
            arrow::array::Decimal128Array::from(vec![1i128]).with_precision_and_scale(ap, as_).unwrap();
            assert_eq!(i32::from(as_), s.clamp(-38, 38), "numeric({p},{s})");
        }
    }

    #[test]
    fn table_names_are_quoted() {
        assert_eq!(quote_table("Orders").unwrap().2, "\"orders\"");
        assert_eq!(quote_table("s.t").unwrap().2, "\"s\".\"t\"");
        assert_eq!(quote_table("\"My \"\"T\"\"\"").unwrap().1, "My \"T\"");
        assert!(quote_table("a.b.c").is_err());
        assert!(quote_table("").is_err());
    }

    #[test]
    fn urls_are_never_echoed() {
        let e = parse_url("postgres://u:s3cret@").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        let c = parse_url("postgres://u:s3cret@db:5433/x").unwrap();
        assert_eq!(describe_target(&c), "db:5433/x");
    }
}
