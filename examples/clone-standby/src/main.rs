//! `clone-standby`: filled by the clone-standby issue.

fn main() {
    eprintln!("clone-standby: not yet implemented (see the clone-standby issue)");
    std::process::exit(2);
}
