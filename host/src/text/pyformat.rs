//! Python's spelling of template values: `json.dumps` (the `tojson` filter transformers
//! installs), `str()` of values printed by `{{ … }}`, and `time.strftime`.
//!
//! Jinja2 runs on Python objects, so a chat template prints `True`, `None`, `['a', 1]` and
//! `1e-05` where minijinja alone would print `true`, `none`, `["a", 1]` and `0.00001`;
//! transformers' `tojson` is `json.dumps(x, ensure_ascii=False, indent=None,
//! separators=None, sort_keys=False)`, not minijinja's HTML-safe JSON. These functions close
//! those gaps. Reference: `transformers/utils/chat_template_utils.py`, CPython `json` and
//! `float.__repr__`.
use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonOptions {
    /// Escape every non-ASCII character as `\uXXXX` (default `false` in transformers).
    pub ensure_ascii: bool,
    /// Pretty-print with this indent string (`indent=2` is two spaces); `None` is one line.
    pub indent: Option<String>,
    /// Item separator; Python's default is `", "` on one line and `","` when indenting.
    pub item_separator: String,
    /// Key separator; Python's default is `": "`.
    pub key_separator: String,
    /// Sort object keys.
    pub sort_keys: bool,
}

impl Default for JsonOptions {
    fn default() -> Self {
        Self {
            ensure_ascii: false,
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            sort_keys: false,
        }
    }
}

impl JsonOptions {
    /// Reads `ensure_ascii`, `indent`, `separators` and `sort_keys` from a filter's keyword
    /// arguments, as Python's `json.dumps` takes them.
    pub fn from_kwargs(kwargs: &Kwargs) -> Result<Self, Error> {
        let mut o = Self::default();
        if let Some(v) = kwargs.get::<Option<bool>>("ensure_ascii")? {
            o.ensure_ascii = v;
        }
        if let Some(v) = kwargs.get::<Option<Value>>("indent")? {
            o.indent = match v.kind() {
                ValueKind::None | ValueKind::Undefined => None,
                ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
                ValueKind::Number if v.is_integer() => {
                    Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize))
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent must be an integer or a string, got {v}"),
                    ))
                }
            };
            if o.indent.is_some() {
                o.item_separator = ",".into();
            }
        }
        if let Some(v) = kwargs.get::<Option<Value>>("separators")? {
            if !v.is_none() {
                let parts: Vec<String> = v
                    .try_iter()
                    .map_err(|_| {
                        Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: separators must be a pair of strings",
                        )
                    })?
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: separators must be a pair of strings",
                        )
                    })?;
                let [item, key] = <[String; 2]>::try_from(parts).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    )
                })?;
                o.item_separator = item;
                o.key_separator = key;
            }
        }
        if let Some(v) = kwargs.get::<Option<bool>>("sort_keys")? {
            o.sort_keys = v;
        }
        kwargs.assert_all_used()?;
        Ok(o)
    }
}

/// Python's `json.dumps(value, **options)`.
pub fn to_json(value: &Value, options: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_json(&mut out, value, options, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, value: &Value, o: &JsonOptions, depth: usize) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_repr(value, true)),
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), o.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_separator);
                }
                newline(out, depth + 1);
                write_json(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
                    ValueKind::Number => number_repr(&key, true),
                    _ => return Err(not_serializable(&key, "as an object key")),
                };
                entries.push((key, item));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_separator);
                }
                newline(out, depth + 1);
                write_json_string(out, key, o.ensure_ascii);
                out.push_str(&o.key_separator);
                write_json(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => return Err(not_serializable(value, "")),
    }
    Ok(())
}

fn not_serializable(value: &Value, what: &str) -> Error {
    let sep = if what.is_empty() { "" } else { " " };
    Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: a value of type {} is not JSON serializable{sep}{what}", value.kind()),
    )
}

/// A JSON string literal as CPython's `json` encoder writes it.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `str(value)`, the text `{{ value }}` prints in Jinja2. Strings print as they
/// are; everything else as Python would (`True`, `None`, `['a', 1]`, `{'k': 1.5}`).
pub fn to_python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => python_repr(value),
    }
}

/// Python's `repr(value)`.
pub fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).into(),
        ValueKind::Number => number_repr(value, false),
        ValueKind::String => string_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => match value.try_iter() {
            Ok(items) => {
                format!("[{}]", items.map(|v| python_repr(&v)).collect::<Vec<_>>().join(", "))
            }
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => {
                let entries: Vec<String> = keys
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or(Value::UNDEFINED);
                        format!("{}: {}", python_repr(&k), python_repr(&v))
                    })
                    .collect();
                format!("{{{}}}", entries.join(", "))
            }
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text has a single quote and no double one.
fn string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// An integer as digits; a float as Python's `repr` (shortest round trip, exponent below
/// 1e-4 and from 1e16 on). `json` spells the non-finite floats `NaN`/`Infinity`.
fn number_repr(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => float_repr(f, json),
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`.
pub fn float_repr(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        return match (f > 0.0, json) {
            (true, true) => "Infinity",
            (false, true) => "-Infinity",
            (true, false) => "inf",
            (false, false) => "-inf",
        }
        .into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr does.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let mantissa =
            if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

/// Python's `str.title()`: a cased character after an uncased one is title-cased, every
/// other one lower-cased (`"they're 3rd"` → `"They'Re 3Rd"`, `'ß'` → `'Ss'`).
pub fn python_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut previous_is_cased = false;
    for c in s.chars() {
        if previous_is_cased {
            out.extend(c.to_lowercase());
        } else {
            out.push_str(&titlecase(c));
        }
        previous_is_cased = is_cased(c);
    }
    out
}

/// Python's `str.capitalize()`: the first character title-cased, the rest lower-cased.
pub fn python_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => titlecase(first) + &chars.as_str().to_lowercase(),
        None => String::new(),
    }
}

fn is_cased(c: char) -> bool {
    c.is_uppercase() || c.is_lowercase() || matches!(c, 'ǅ' | 'ǈ' | 'ǋ' | 'ǲ')
}

/// Unicode title case: the four digraphs have their own title-case letter; a character
/// whose upper case is several letters keeps the first one upper (`ß` → `Ss`, `ﬁ` → `Fi`).
fn titlecase(c: char) -> String {
    match c {
        'Ǆ' | 'ǅ' | 'ǆ' => "ǅ".into(),
        'Ǉ' | 'ǈ' | 'ǉ' => "ǈ".into(),
        'Ǌ' | 'ǋ' | 'ǌ' => "ǋ".into(),
        'Ǳ' | 'ǲ' | 'ǳ' => "ǲ".into(),
        c => {
            let mut upper = c.to_uppercase();
            let first = upper.next().map(String::from).unwrap_or_default();
            first + &upper.collect::<String>().to_lowercase()
        }
    }
}

/// `time.strftime(format)` for a UTC time given as seconds since the Unix epoch. Supports
/// the codes chat templates use (`%Y %y %m %d %e %H %I %M %S %p %j %a %A %b %B %h %Z %z %%`)
/// and glibc's `-` flag (`%-d`); any other code is an error that names it.
pub fn strftime_utc(format: &str, unix_seconds: i64) -> Result<String, String> {
    const DAYS: [&str; 7] =
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut code = chars.next().ok_or("strftime: format ends with a lone '%'")?;
        let unpadded = code == '-';
        if unpadded {
            code = chars.next().ok_or("strftime: format ends with '%-'")?;
        }
        let num = |out: &mut String, v: i64, width: usize, pad: char| {
            if unpadded {
                let _ = write!(out, "{v}");
            } else if pad == ' ' {
                let _ = write!(out, "{v:>width$}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match code {
            'Y' => num(&mut out, year, 4, '0'),
            'y' => num(&mut out, year.rem_euclid(100), 2, '0'),
            'm' => num(&mut out, month, 2, '0'),
            'd' => num(&mut out, day, 2, '0'),
            'e' => num(&mut out, day, 2, ' '),
            'H' => num(&mut out, hour, 2, '0'),
            'I' => num(&mut out, hour12, 2, '0'),
            'M' => num(&mut out, minute, 2, '0'),
            'S' => num(&mut out, second, 2, '0'),
            'j' => num(&mut out, yday, 3, '0'),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'b' | 'h' => out.push_str(&MONTHS[month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[month as usize - 1]),
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            '%' => out.push('%'),
            other => return Err(format!("strftime: unsupported format code %{other}")),
        }
    }
    Ok(out)
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian; H. Hinnant).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Day count since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(v: serde_json::Value, o: &JsonOptions) -> String {
        to_json(&Value::from_serialize(&v), o).unwrap()
    }

    /// Expected strings are CPython 3.11's `json.dumps` / `repr` output for the same values.
    #[test]
    fn json_dumps_matches_python() {
        let v = serde_json::json!({"a": [1, 2.5, null, true], "b": "x\"y\\z\n\u{1}é🦀", "c": {}, "d": []});
        let d = JsonOptions::default();
        assert_eq!(
            json(v.clone(), &d),
            r#"{"a": [1, 2.5, null, true], "b": "x\"y\\z\n\u0001é🦀", "c": {}, "d": []}"#
        );
        let ascii = JsonOptions { ensure_ascii: true, ..d.clone() };
        assert_eq!(json(serde_json::json!("é🦀"), &ascii), r#""\u00e9\ud83e\udd80""#);
        let indented =
            JsonOptions { indent: Some("  ".into()), item_separator: ",".into(), ..d.clone() };
        assert_eq!(
            json(serde_json::json!({"a": [1, 2], "b": {}}), &indented),
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}"
        );
        let compact = JsonOptions {
            item_separator: ",".into(),
            key_separator: ":".into(),
            sort_keys: true,
            ..d
        };
        assert_eq!(
            json(serde_json::json!({"b": 1, "a": [1, 2]}), &compact),
            r#"{"a":[1,2],"b":1}"#
        );
    }

    #[test]
    fn float_repr_matches_python() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (-2.5e-7, "-2.5e-07"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(float_repr(f, false), want, "{f:e}");
        }
        assert_eq!(float_repr(f64::INFINITY, true), "Infinity");
        assert_eq!(float_repr(f64::NAN, false), "nan");
    }

    #[test]
    fn python_str_of_values() {
        let v =
            Value::from_serialize(serde_json::json!([1, "it's", "a", null, true, 0.5, {"k": "v"}]));
        assert_eq!(to_python_str(&v), r#"[1, "it's", 'a', None, True, 0.5, {'k': 'v'}]"#);
        assert_eq!(to_python_str(&Value::from(false)), "False");
        assert_eq!(to_python_str(&Value::from("plain")), "plain");
    }

    /// Known instants, checked with GNU `date -u -d @SECONDS +FORMAT`.
    /// Expected strings are CPython's `str.title()` / `str.capitalize()`.
    #[test]
    fn title_and_capitalize_match_python() {
        assert_eq!(
            python_title("what is 'ß'.upper()? they're 3rd ǆemal ﬁne"),
            "What Is 'Ss'.Upper()? They'Re 3Rd ǅemal Fine"
        );
        assert_eq!(python_capitalize("ßTRASSE Straße"), "Sstrasse straße");
        assert_eq!(python_capitalize(""), "");
    }

    #[test]
    fn strftime_known_instants() {
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %p %I", 0).unwrap(),
            "1970-01-01 00:00:00 Thu Thursday Jan January 001 AM 12"
        );
        // 2000-02-29 13:05:09 UTC, a leap day.
        assert_eq!(
            strftime_utc("%d %b %Y, %-d/%-m/%y %e %H%%", 951_829_509).unwrap(),
            "29 Feb 2000, 29/2/00 29 13%"
        );
        assert_eq!(strftime_utc("%j %A", 951_829_509).unwrap(), "060 Tuesday");
        // 1969-12-31 23:59:59, before the epoch.
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", -1).unwrap(), "1969-12-31 23:59:59");
        assert!(strftime_utc("%Q", 0).unwrap_err().contains("%Q"));
    }
}
