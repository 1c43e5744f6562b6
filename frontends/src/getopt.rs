//! Command-line parsing with glibc `getopt_long` semantics, which PostgreSQL's tools
//! use and which operators' scripts rely on: clustered short options (`-vP`), attached
//! or separate arguments (`-Xstream`, `-X stream`, `--wal-method=stream`), unambiguous
//! abbreviations of long options (`--checkp fast`), options after operands
//! (permutation), and `--` to end the options. Error texts are glibc's, since
//! PostgreSQL's tests and some scripts match on them.
//!
//! Pure: no I/O, so it is unit- and property-tested.

/// Whether an option takes an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HasArg {
    /// A flag.
    No,
    /// An argument is required: attached (`-Dx`, `--pgdata=x`) or the next word.
    Required,
    /// An argument may be attached (`-Zx`, `--opt=x`), never taken from the next word.
    Optional,
}

/// One option a tool accepts.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// Its one-letter form, if any.
    pub short: Option<char>,
    /// Its long form without the leading `--`, if any.
    pub long: Option<&'static str>,
    /// Whether it takes an argument.
    pub has_arg: HasArg,
    /// The name the tool matches on (usually the long name).
    pub id: &'static str,
}

impl Opt {
    /// An option with both forms.
    pub const fn both(short: char, long: &'static str, has_arg: HasArg) -> Opt {
        Opt {
            short: Some(short),
            long: Some(long),
            has_arg,
            id: long,
        }
    }

    /// An option with only a long form.
    pub const fn long(long: &'static str, has_arg: HasArg) -> Opt {
        Opt {
            short: None,
            long: Some(long),
            has_arg,
            id: long,
        }
    }
}

/// The options found, in command-line order, and the operands (non-option words).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `(id, argument)` for each option given, in order.
    pub options: Vec<(&'static str, Option<String>)>,
    /// The operands, in order.
    pub operands: Vec<String>,
}

/// Parses `args` (without `argv[0]`) against `spec`. On a mistake, returns glibc's
/// message, which starts with `argv0` as given (for example
/// `/usr/bin/pg_basebackup: unrecognized option '--bogus'`); the tool prints it and
/// then its `Try "… --help"` hint.
///
/// ```
/// use pg_frontends::getopt::{parse, HasArg, Opt};
/// let spec = [
///     Opt::both('D', "pgdata", HasArg::Required),
///     Opt::both('v', "verbose", HasArg::No),
///     Opt::both('P', "progress", HasArg::No),
/// ];
/// let args: Vec<String> = ["-vP", "--pgd=/tmp/x", "extra"].map(String::from).to_vec();
/// let parsed = parse("pg_basebackup", &args, &spec).unwrap();
/// assert_eq!(parsed.options[2], ("pgdata", Some("/tmp/x".to_string())));
/// assert_eq!(parsed.operands, ["extra"]);
/// ```
pub fn parse(argv0: &str, args: &[String], spec: &[Opt]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut index = 0;
    while index < args.len() {
        let arg = &args[index];
        index += 1;
        if arg == "--" {
            parsed.operands.extend(args[index..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, attached) = match body.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (body, None),
            };
            let opt = find_long(argv0, name, body, spec)?;
            let long = opt.long.unwrap_or(name);
            let value = match (opt.has_arg, attached) {
                (HasArg::No, Some(_)) => {
                    return Err(format!(
                        "{argv0}: option '--{long}' doesn't allow an argument"
                    ))
                }
                (HasArg::No, None) => None,
                (HasArg::Optional, attached) => attached,
                (HasArg::Required, Some(value)) => Some(value),
                (HasArg::Required, None) => match args.get(index) {
                    Some(next) => {
                        index += 1;
                        Some(next.clone())
                    }
                    None => return Err(format!("{argv0}: option '--{long}' requires an argument")),
                },
            };
            parsed.options.push((opt.id, value));
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            // `-` alone and words without a dash are operands (permutation).
            parsed.operands.push(arg.clone());
            continue;
        };
        for (offset, letter) in cluster.char_indices() {
            let Some(opt) = spec.iter().find(|o| o.short == Some(letter)) else {
                return Err(format!("{argv0}: invalid option -- '{letter}'"));
            };
            let rest = &cluster[offset + letter.len_utf8()..];
            match opt.has_arg {
                HasArg::No => parsed.options.push((opt.id, None)),
                HasArg::Optional => {
                    let value = (!rest.is_empty()).then(|| rest.to_string());
                    parsed.options.push((opt.id, value));
                    break;
                }
                HasArg::Required => {
                    let value = if !rest.is_empty() {
                        rest.to_string()
                    } else if let Some(next) = args.get(index) {
                        index += 1;
                        next.clone()
                    } else {
                        return Err(format!(
                            "{argv0}: option requires an argument -- '{letter}'"
                        ));
                    };
                    parsed.options.push((opt.id, Some(value)));
                    break;
                }
            }
        }
    }
    Ok(parsed)
}

/// The long option `name` names: an exact match, or the only option it abbreviates.
fn find_long<'s>(argv0: &str, name: &str, body: &str, spec: &'s [Opt]) -> Result<&'s Opt, String> {
    if let Some(exact) = spec.iter().find(|o| o.long == Some(name)) {
        return Ok(exact);
    }
    let candidates: Vec<&Opt> = spec
        .iter()
        .filter(|o| !name.is_empty() && o.long.is_some_and(|l| l.starts_with(name)))
        .collect();
    match candidates.as_slice() {
        [] => Err(format!("{argv0}: unrecognized option '--{body}'")),
        [only] => Ok(only),
        [first, ..]
            if candidates
                .iter()
                .all(|c| c.id == first.id && c.has_arg == first.has_arg) =>
        {
            Ok(first)
        }
        _ => {
            let possibilities: String = candidates
                .iter()
                .filter_map(|c| c.long)
                .map(|l| format!(" '--{l}'"))
                .collect();
            Err(format!(
                "{argv0}: option '--{name}' is ambiguous; possibilities:{possibilities}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPEC: [Opt; 6] = [
        Opt::both('D', "pgdata", HasArg::Required),
        Opt::both('c', "checkpoint", HasArg::Required),
        Opt::both('Z', "compress", HasArg::Required),
        Opt::both('v', "verbose", HasArg::No),
        Opt::both('P', "progress", HasArg::No),
        Opt::long("no-clean-up", HasArg::Optional),
    ];

    fn run(args: &[&str]) -> Result<Parsed, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        parse("prog", &args, &SPEC)
    }

    #[test]
    fn short_forms() {
        let p = run(&["-vPDdir", "-c", "fast", "-Z9"]).unwrap();
        assert_eq!(
            p.options,
            [
                ("verbose", None),
                ("progress", None),
                ("pgdata", Some("dir".into())),
                ("checkpoint", Some("fast".into())),
                ("compress", Some("9".into())),
            ]
        );
    }

    #[test]
    fn long_forms_abbreviations_and_operands() {
        let p = run(&[
            "x",
            "--pgdata",
            "d",
            "--check=spread",
            "-",
            "--no-clean-up=1",
            "--",
            "-v",
        ])
        .unwrap();
        assert_eq!(
            p.options,
            [
                ("pgdata", Some("d".into())),
                ("checkpoint", Some("spread".into())),
                ("no-clean-up", Some("1".into())),
            ]
        );
        assert_eq!(p.operands, ["x", "-", "-v"]);
    }

    #[test]
    fn glibc_messages() {
        assert_eq!(
            run(&["--not-a-valid-option"]).unwrap_err(),
            "prog: unrecognized option '--not-a-valid-option'"
        );
        assert_eq!(
            run(&["--bogus=1"]).unwrap_err(),
            "prog: unrecognized option '--bogus=1'"
        );
        assert_eq!(run(&["-x"]).unwrap_err(), "prog: invalid option -- 'x'");
        assert_eq!(
            run(&["-D"]).unwrap_err(),
            "prog: option requires an argument -- 'D'"
        );
        assert_eq!(
            run(&["--pgdata"]).unwrap_err(),
            "prog: option '--pgdata' requires an argument"
        );
        assert_eq!(
            run(&["--verbose=1"]).unwrap_err(),
            "prog: option '--verbose' doesn't allow an argument"
        );
        assert_eq!(
            run(&["--c", "x"]).unwrap_err(),
            "prog: option '--c' is ambiguous; possibilities: '--checkpoint' '--compress'"
        );
    }

    proptest! {
        /// Any words parse or fail with a message; nothing panics, and every word ends
        /// up as an option, an option's argument or an operand.
        #[test]
        fn never_panics(words in proptest::collection::vec("(-{0,2}[a-zA-Z=]{0,6})|(\\PC{0,4})", 0..8)) {
            let _ = run(&words.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
