//! `pg_basebackup`, as a drop-in replacement; see [`pg_frontends::pg_basebackup`].

fn main() -> std::process::ExitCode {
    pg_frontends::pg_basebackup::main(std::env::args_os().collect())
}
