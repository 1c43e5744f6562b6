//! `--compress` specifications, checked as PostgreSQL 15–18's front-ends check them
//! (`common/compression.c`), with the same message texts, because scripts and
//! PostgreSQL's own tests match on them.

/// A compression algorithm name PostgreSQL knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// LZ4.
    Lz4,
    /// zstd.
    Zstd,
}

impl Algorithm {
    /// Parses an algorithm name.
    pub fn parse(name: &str) -> Option<Algorithm> {
        Some(match name {
            "none" => Algorithm::None,
            "gzip" => Algorithm::Gzip,
            "lz4" => Algorithm::Lz4,
            "zstd" => Algorithm::Zstd,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::None => "none",
            Algorithm::Gzip => "gzip",
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        }
    }
}

/// Where the compression happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Not said (`gzip:5`): the client, unless a backup target is used.
    Unspecified,
    /// `client-…`.
    Client,
    /// `server-…`.
    Server,
}

/// A `--compress` argument split as pg_basebackup splits it, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressArg {
    /// The algorithm name as typed.
    pub algorithm: String,
    /// The text after the first `:`, if any.
    pub detail: Option<String>,
    /// Where.
    pub location: Location,
}

/// Splits a `--compress` argument: a bare integer is a gzip level (0 = none);
/// otherwise `[client-|server-]ALGORITHM[:DETAIL]`.
///
/// ```
/// use pg_frontends::pg_basebackup::spec::{split_compress_arg, Location};
/// let a = split_compress_arg("server-zstd:level=3");
/// assert_eq!((a.algorithm.as_str(), a.detail.as_deref(), a.location), ("zstd", Some("level=3"), Location::Server));
/// assert_eq!(split_compress_arg("0").algorithm, "none");
/// assert_eq!(split_compress_arg("5").detail.as_deref(), Some("5"));
/// ```
pub fn split_compress_arg(arg: &str) -> CompressArg {
    if let Some(level) = parse_c_long(arg) {
        return if level == 0 {
            CompressArg {
                algorithm: "none".into(),
                detail: None,
                location: Location::Unspecified,
            }
        } else {
            CompressArg {
                algorithm: "gzip".into(),
                detail: Some(arg.to_string()),
                location: Location::Unspecified,
            }
        };
    }
    let (first, detail) = match arg.split_once(':') {
        Some((first, detail)) => (first, Some(detail.to_string())),
        None => (arg, None),
    };
    let (location, algorithm) = if let Some(rest) = first.strip_prefix("server-") {
        (Location::Server, rest)
    } else if let Some(rest) = first.strip_prefix("client-") {
        (Location::Client, rest)
    } else {
        (Location::Unspecified, first)
    };
    CompressArg {
        algorithm: algorithm.to_string(),
        detail,
        location,
    }
}

/// A whole-string integer as C's `strtol` with a full-string check accepts it (leading
/// blanks and a sign allowed).
fn parse_c_long(text: &str) -> Option<i64> {
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let digits = trimmed.strip_prefix(['+', '-']).unwrap_or(trimmed);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    trimmed.parse::<i64>().ok()
}

/// A checked specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The level, when given.
    pub level: Option<i32>,
    /// zstd workers, when given.
    pub workers: Option<u32>,
    /// zstd long-distance mode.
    pub long: bool,
}

/// Parses and checks `detail` for `algorithm`; the error is the text after
/// `invalid compression specification: `.
///
/// ```
/// use pg_frontends::pg_basebackup::spec::{parse_spec, Algorithm};
/// assert_eq!(parse_spec(Algorithm::Gzip, Some("level=9")).unwrap().level, Some(9));
/// assert_eq!(
///     parse_spec(Algorithm::Gzip, Some("level=236")).unwrap_err(),
///     "compression algorithm \"gzip\" expects a compression level between 1 and 9"
/// );
/// ```
pub fn parse_spec(algorithm: Algorithm, detail: Option<&str>) -> Result<Spec, String> {
    let mut spec = Spec {
        algorithm,
        level: None,
        workers: None,
        long: false,
    };
    if let Some(detail) = detail {
        if let Some(level) = parse_c_long(detail) {
            spec.level = Some(level.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
        } else {
            for item in detail.split(',') {
                let (keyword, value) = match item.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (item, None),
                };
                if keyword.is_empty() {
                    return Err("found empty string where a compression option was expected".into());
                }
                let integer = |value: Option<&str>| -> Result<i64, String> {
                    let value = value.ok_or_else(|| {
                        format!("compression option \"{keyword}\" requires a value")
                    })?;
                    parse_c_long(value).ok_or_else(|| {
                        format!("value for compression option \"{keyword}\" must be an integer")
                    })
                };
                match keyword {
                    "level" => {
                        spec.level =
                            Some(integer(value)?.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
                    }
                    "workers" => {
                        spec.workers = Some(integer(value)?.clamp(0, u32::MAX as i64) as u32)
                    }
                    "long" => {
                        spec.long = match value {
                            None => true,
                            Some(v) => parse_bool(v).ok_or_else(|| {
                                format!(
                                    "value for compression option \"{keyword}\" must be a Boolean value"
                                )
                            })?,
                        }
                    }
                    other => return Err(format!("unrecognized compression option: \"{other}\"")),
                }
            }
        }
    }
    let name = algorithm.name();
    if let Some(level) = spec.level {
        let (min, max) = match algorithm {
            Algorithm::Gzip => (1, 9),
            Algorithm::Lz4 => (1, 12),
            Algorithm::Zstd => (-131072, 22),
            Algorithm::None => {
                return Err(format!(
                    "compression algorithm \"{name}\" does not accept a compression level"
                ))
            }
        };
        if level < min || level > max {
            return Err(format!(
                "compression algorithm \"{name}\" expects a compression level between {min} and {max}"
            ));
        }
    }
    if spec.workers.is_some() && algorithm != Algorithm::Zstd {
        return Err(format!(
            "compression algorithm \"{name}\" does not accept a worker count"
        ));
    }
    if spec.long && algorithm != Algorithm::Zstd {
        return Err(format!(
            "compression algorithm \"{name}\" does not support long-distance mode"
        ));
    }
    Ok(spec)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" | "t" | "y" => Some(true),
        "off" | "false" | "no" | "0" | "f" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tap_suite_cases() {
        let cases = [
            (
                "gzip:",
                "found empty string where a compression option was expected",
            ),
            ("gzip:thunk", "unrecognized compression option: \"thunk\""),
            (
                "gzip:level",
                "compression option \"level\" requires a value",
            ),
            (
                "gzip:level=",
                "value for compression option \"level\" must be an integer",
            ),
            (
                "gzip:level=high",
                "value for compression option \"level\" must be an integer",
            ),
            (
                "gzip:level=236",
                "compression algorithm \"gzip\" expects a compression level between 1 and 9",
            ),
            (
                "gzip:level=9,",
                "found empty string where a compression option was expected",
            ),
            (
                "gzip:workers=3",
                "compression algorithm \"gzip\" does not accept a worker count",
            ),
            (
                "none:1",
                "compression algorithm \"none\" does not accept a compression level",
            ),
        ];
        for (arg, message) in cases {
            let split = split_compress_arg(arg);
            let algorithm = Algorithm::parse(&split.algorithm).unwrap();
            assert_eq!(
                parse_spec(algorithm, split.detail.as_deref()).unwrap_err(),
                message,
                "{arg}"
            );
        }
        assert!(Algorithm::parse(&split_compress_arg("none+").algorithm).is_none());
        let ok = parse_spec(Algorithm::Zstd, Some("level=3,workers=2,long")).unwrap();
        assert_eq!((ok.level, ok.workers, ok.long), (Some(3), Some(2), true));
        assert_eq!(
            parse_spec(Algorithm::Gzip, Some("1")).unwrap().level,
            Some(1)
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text is split and checked without a panic, and an accepted level is in
        /// the algorithm's range.
        #[test]
        fn never_panics(arg in ".{0,40}") {
            let split = split_compress_arg(&arg);
            if let Some(algorithm) = Algorithm::parse(&split.algorithm) {
                if let Ok(spec) = parse_spec(algorithm, split.detail.as_deref()) {
                    if let Some(level) = spec.level {
                        prop_assert!((-131072..=22).contains(&level));
                    }
                }
            }
        }
    }
}
