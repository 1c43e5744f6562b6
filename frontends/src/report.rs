//! Messages in the PostgreSQL tools' format (`pg_basebackup: error: …`,
//! `pg_basebackup: hint: …`), which scripts and PostgreSQL's own tests match on.

use std::ffi::OsStr;
use std::path::Path;

/// The program name as PostgreSQL's `get_progname` derives it: the last component of
/// `argv[0]`, without a trailing `.exe`.
///
/// ```
/// assert_eq!(pg_frontends::report::progname("/usr/bin/pg_basebackup"), "pg_basebackup");
/// ```
pub fn progname(argv0: impl AsRef<OsStr>) -> String {
    let name = Path::new(argv0.as_ref())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".exe").map(str::to_owned).unwrap_or(name)
}

/// The newest server major version the front-ends know.
pub const NEWEST_MAJOR: u32 = 18;

/// `--version` output: the `<prog> (PostgreSQL) N` shape that scripts parse, with this
/// implementation named after it.
///
/// ```
/// let line = pg_frontends::report::version_line("pg_receivewal");
/// assert!(line.starts_with("pg_receivewal (PostgreSQL) 18 (pgrepl "));
/// ```
pub fn version_line(prog: &str) -> String {
    format!(
        "{prog} (PostgreSQL) {NEWEST_MAJOR} (pgrepl {})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Prints `<prog>: error: <message>` to standard error.
pub fn error(prog: &str, message: impl std::fmt::Display) {
    eprintln!("{prog}: error: {message}");
}

/// Prints `<prog>: warning: <message>` to standard error.
pub fn warning(prog: &str, message: impl std::fmt::Display) {
    eprintln!("{prog}: warning: {message}");
}

/// Prints `<prog>: hint: <message>` to standard error.
pub fn hint(prog: &str, message: impl std::fmt::Display) {
    eprintln!("{prog}: hint: {message}");
}

/// Reports a command-line mistake and returns the exit status 1: getopt's own complaint
/// (which carries glibc's prefix) as is, any other as `<prog>: error: …`, then the
/// `Try "<prog> --help"` hint when `hint` is set.
pub fn usage_failed(prog: &str, message: &str, from_getopt: bool, hint: bool) -> i32 {
    if from_getopt {
        eprintln!("{message}");
    } else {
        error(prog, message);
    }
    if hint {
        try_help(prog);
    }
    1
}

/// Prints the usual hint after a command-line mistake: `Try "<prog> --help" for more
/// information.`
pub fn try_help(prog: &str) {
    hint(
        prog,
        format_args!("Try \"{prog} --help\" for more information."),
    );
}
