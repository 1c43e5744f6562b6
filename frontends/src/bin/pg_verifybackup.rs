//! `pg_verifybackup`: see [`pg_frontends::pg_verifybackup`].

fn main() {
    std::process::exit(pg_frontends::pg_verifybackup::main(
        std::env::args_os().collect(),
    ));
}
