//! Helpers shared by the configuration tests.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{Config, Host};
use crate::error::{Error, ErrorKind};

pub(super) fn tcp(name: &str) -> Host {
    Host::Tcp(name.to_string())
}

pub(super) fn unix(dir: &str) -> Host {
    Host::Unix(PathBuf::from(dir))
}

pub(super) fn some(value: &str) -> Option<String> {
    Some(value.to_string())
}

pub(super) fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

pub(super) fn parse_err(conninfo: &str) -> Error {
    match Config::parse(conninfo) {
        Ok(config) => panic!("{conninfo:?} parsed to {config:?}, expected an error"),
        Err(err) => err,
    }
}

pub(super) type Build = fn(&mut Config);

pub(super) fn check_cases(cases: &[(&str, Build)]) {
    for (input, build) in cases {
        let mut expected = Config::default();
        build(&mut expected);
        match Config::parse(input) {
            Ok(config) => assert_eq!(config, expected, "input: {input:?}"),
            Err(err) => panic!("input {input:?} failed: {err}"),
        }
    }
}

/// Checks that each input fails to parse with a configuration error whose message
/// contains every needle, and that the error has advice.
pub(super) fn check_errors(cases: &[(&str, &[&str])]) {
    for (input, needles) in cases {
        let err = match Config::parse(input) {
            Ok(config) => panic!("{input:?} parsed to {config:?}, expected an error"),
            Err(err) => err,
        };
        assert_eq!(err.kind(), ErrorKind::Config, "{input:?}");
        for needle in *needles {
            assert!(
                err.message().contains(needle),
                "{input:?}: {:?} lacks {needle:?}",
                err.message()
            );
        }
        assert!(
            err.advice().is_some_and(|a| !a.is_empty()),
            "{input:?} has no advice"
        );
    }
}
