//! `pg_receivewal`: see [`pg_frontends::pg_receivewal`].

fn main() {
    std::process::exit(pg_frontends::pg_receivewal::main(
        std::env::args_os().collect(),
    ));
}
