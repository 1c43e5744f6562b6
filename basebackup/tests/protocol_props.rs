//! Property tests of the BASE_BACKUP response state machine (`protocol::BackupResponse`):
//!
//! - a well-formed response, in either framing (13/14 and 15+), any number of
//!   tablespaces, any chunking, with or without a manifest and server compression,
//!   yields exactly the archives and manifest that were sent, in order, then `Done`;
//! - arbitrary message sequences (plausible messages mixed with nonsense) never make it
//!   panic; whatever it yields follows the event grammar; once it fails it refuses
//!   everything after, and after `Done` it accepts nothing;
//! - a well-formed response with one message dropped, duplicated, moved or inserted is
//!   either refused or still yields a complete, consistent backup.
//!
//! Failing cases proptest finds are saved in `protocol_props.proptest-regressions`.

use basebackup::protocol::{BackupEvent, BackupResponse};
use basebackup::{BackupOptions, CompressionMethod, ManifestMode, ServerCompression, Tablespace};
use bytes::Bytes;
use pgwire_repl::proto::backend::{BackendMessage, CopyResponse, FieldDescription};
use pgwire_repl::DbError;
use proptest::prelude::*;

fn column(name: &str) -> FieldDescription {
    FieldDescription {
        name: name.into(),
        table_oid: 0,
        column_id: 0,
        type_oid: 25,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }
}

fn cell(text: Option<&str>) -> Option<Bytes> {
    text.map(|t| Bytes::copy_from_slice(t.as_bytes()))
}

fn position(lsn: &str, tli: &str) -> Vec<BackendMessage> {
    vec![
        BackendMessage::RowDescription(vec![column("recptr"), column("tli")]),
        BackendMessage::DataRow(vec![cell(Some(lsn)), cell(Some(tli))]),
        BackendMessage::CommandComplete {
            tag: "SELECT".into(),
        },
    ]
}

fn copy_out() -> BackendMessage {
    BackendMessage::CopyOutResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    })
}

fn sub(kind: u8, body: &[u8]) -> BackendMessage {
    let mut payload = vec![kind];
    payload.extend_from_slice(body);
    BackendMessage::CopyData(Bytes::from(payload))
}

/// A backup as a server would send it.
#[derive(Debug, Clone)]
struct Backup {
    major: u32,
    /// User tablespaces (the base directory is added last).
    tablespaces: Vec<(u32, String)>,
    /// Each archive's bytes (one per tablespace, base last), already cut into chunks.
    archives: Vec<Vec<Vec<u8>>>,
    manifest: Option<Vec<Vec<u8>>>,
    compression: Option<CompressionMethod>,
}

impl Backup {
    fn options(&self) -> BackupOptions {
        let mut options = BackupOptions::default();
        if self.manifest.is_none() {
            options.manifest = ManifestMode::No;
        }
        options.compression = self.compression.map(ServerCompression::new);
        options
    }

    fn list(&self) -> Vec<Tablespace> {
        let mut list: Vec<Tablespace> = self
            .tablespaces
            .iter()
            .map(|(oid, location)| Tablespace {
                oid: Some(*oid),
                location: Some(location.clone()),
                size_estimate: Some(1024),
            })
            .collect();
        list.push(Tablespace {
            oid: None,
            location: None,
            size_estimate: Some(2048),
        });
        list
    }

    fn archive_name(&self, index: usize) -> String {
        let base = match self.tablespaces.get(index) {
            Some((oid, _)) => format!("{oid}.tar"),
            None => "base.tar".into(),
        };
        format!("{base}{}", self.compression.map_or("", |m| m.suffix()))
    }

    fn messages(&self) -> Vec<BackendMessage> {
        let mut m = position("0/2000028", "1");
        m.push(BackendMessage::RowDescription(vec![
            column("spcoid"),
            column("spclocation"),
            column("size"),
        ]));
        for ts in self.list() {
            let oid = ts.oid.map(|o| o.to_string());
            m.push(BackendMessage::DataRow(vec![
                cell(oid.as_deref()),
                cell(ts.location.as_deref()),
                cell(Some(&(ts.size_estimate.unwrap() / 1024).to_string())),
            ]));
        }
        m.push(BackendMessage::CommandComplete {
            tag: "SELECT".into(),
        });
        if self.major < 15 {
            for archive in &self.archives {
                m.push(copy_out());
                for chunk in archive {
                    m.push(BackendMessage::CopyData(Bytes::copy_from_slice(chunk)));
                }
                m.push(BackendMessage::CopyDone);
            }
            if let Some(manifest) = &self.manifest {
                m.push(copy_out());
                for chunk in manifest {
                    m.push(BackendMessage::CopyData(Bytes::copy_from_slice(chunk)));
                }
                m.push(BackendMessage::CopyDone);
            }
        } else {
            m.push(copy_out());
            let mut done = 0u64;
            for (index, archive) in self.archives.iter().enumerate() {
                let mut n = self.archive_name(index).into_bytes();
                n.push(0);
                if let Some((_, location)) = self.tablespaces.get(index) {
                    n.extend_from_slice(location.as_bytes());
                }
                n.push(0);
                m.push(sub(b'n', &n));
                for chunk in archive {
                    m.push(sub(b'd', chunk));
                    done += chunk.len() as u64;
                    m.push(sub(b'p', &done.to_be_bytes()));
                }
            }
            if let Some(manifest) = &self.manifest {
                m.push(sub(b'm', b""));
                for chunk in manifest {
                    m.push(sub(b'd', chunk));
                }
            }
            m.push(BackendMessage::CopyDone);
        }
        m.extend(position("0/2000100", "1"));
        m.push(BackendMessage::CommandComplete {
            tag: "BASE_BACKUP".into(),
        });
        m.push(BackendMessage::ReadyForQuery { status: b'I' });
        m
    }
}

fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5)
}

fn backup() -> impl Strategy<Value = Backup> {
    (
        13u32..=18,
        proptest::collection::btree_map(16384u32..17000, "/srv/ts[a-z0-9]{1,8}", 0..4),
        any::<bool>(),
        0usize..4,
    )
        .prop_flat_map(|(major, tablespaces, with_manifest, compression)| {
            let tablespaces: Vec<(u32, String)> = tablespaces.into_iter().collect();
            let count = tablespaces.len() + 1;
            (
                Just(major),
                Just(tablespaces),
                proptest::collection::vec(chunks(), count),
                chunks().prop_map(move |m| with_manifest.then_some(m)),
                Just(compression),
            )
        })
        .prop_map(|(major, tablespaces, archives, manifest, compression)| {
            let compression = match (major >= 15, compression) {
                (true, 1) => Some(CompressionMethod::Gzip),
                (true, 2) => Some(CompressionMethod::Lz4),
                (true, 3) => Some(CompressionMethod::Zstd),
                _ => None,
            };
            Backup {
                major,
                tablespaces,
                archives,
                manifest,
                compression,
            }
        })
}

/// Checks the event grammar as events arrive; panics (fails the property) on a
/// violation.
#[derive(Debug, Default)]
struct Grammar {
    started: bool,
    tablespaces: Option<Vec<Tablespace>>,
    in_archive: bool,
    archives: usize,
    in_manifest: bool,
    ended: bool,
    done: bool,
}

impl Grammar {
    fn feed(&mut self, event: &BackupEvent) {
        assert!(!self.done, "{event:?} after Done");
        match event {
            BackupEvent::Started { .. } => {
                assert!(!self.started, "Started twice");
                self.started = true;
            }
            BackupEvent::Tablespaces(list) => {
                assert!(
                    self.started && self.tablespaces.is_none(),
                    "{event:?} out of order"
                );
                assert!(list.last().is_some_and(|t| t.oid.is_none()));
                self.tablespaces = Some(list.clone());
            }
            BackupEvent::ArchiveStart(archive) => {
                let list = self.tablespaces.as_ref().expect("archive before the list");
                assert!(!self.in_archive && !self.in_manifest && !self.ended);
                assert_eq!(
                    Some(&archive.tablespace),
                    list.get(self.archives),
                    "archive {} is not the list's",
                    self.archives
                );
                self.archives += 1;
                self.in_archive = true;
            }
            BackupEvent::ArchiveData(_) => assert!(self.in_archive, "data outside an archive"),
            BackupEvent::Progress(_) => assert!(
                self.tablespaces.is_some() && !self.ended,
                "progress out of place"
            ),
            BackupEvent::ArchiveEnd => {
                assert!(self.in_archive, "ArchiveEnd outside an archive");
                self.in_archive = false;
            }
            BackupEvent::ManifestStart => {
                assert!(!self.in_archive && !self.in_manifest && !self.ended);
                assert_eq!(
                    Some(self.archives),
                    self.tablespaces.as_ref().map(Vec::len),
                    "manifest before every archive"
                );
                self.in_manifest = true;
            }
            BackupEvent::ManifestData(_) => assert!(self.in_manifest, "manifest data out of place"),
            BackupEvent::Ended { .. } => {
                assert!(!self.in_archive && !self.ended, "Ended out of place");
                assert_eq!(
                    Some(self.archives),
                    self.tablespaces.as_ref().map(Vec::len),
                    "ended before every archive"
                );
                self.ended = true;
            }
            BackupEvent::Done => {
                assert!(self.ended, "Done before Ended");
                self.done = true;
            }
        }
    }
}

/// Feeds `messages`; returns the events until the first error (and whether there was
/// one), checking the grammar and that nothing is accepted after an error or `Done`.
fn run(
    response: &mut BackupResponse,
    messages: Vec<BackendMessage>,
) -> (Vec<BackupEvent>, Option<basebackup::Error>) {
    let mut grammar = Grammar::default();
    let mut events = Vec::new();
    let mut messages = messages.into_iter();
    for message in messages.by_ref() {
        match response.handle(message) {
            Ok(produced) => {
                for event in produced {
                    grammar.feed(&event);
                    events.push(event);
                }
                assert_eq!(response.is_done(), grammar.done);
                if grammar.done {
                    break;
                }
            }
            Err(e) => {
                assert!(response.is_failed() && response.is_done());
                // Ignored messages are ignored even then; everything else is refused.
                for next in messages {
                    let ignored = matches!(
                        next,
                        BackendMessage::NoticeResponse(_) | BackendMessage::ParameterStatus { .. }
                    );
                    assert_eq!(response.handle(next).is_err(), !ignored);
                }
                return (events, Some(e));
            }
        }
    }
    if grammar.done {
        // After Done nothing is accepted.
        for next in messages {
            let ignored = matches!(
                next,
                BackendMessage::NoticeResponse(_) | BackendMessage::ParameterStatus { .. }
            );
            assert_eq!(response.handle(next).is_err(), !ignored);
        }
    }
    (events, None)
}

/// Arbitrary messages, biased towards what a BASE_BACKUP response holds.
fn message() -> impl Strategy<Value = BackendMessage> {
    let text = prop_oneof![
        Just(None),
        Just(Some("0/2000028".to_string())),
        Just(Some("1".to_string())),
        Just(Some("16384".to_string())),
        Just(Some("/srv/ts".to_string())),
        Just(Some("zz".to_string())),
        "[0-9A-F/]{0,12}".prop_map(Some),
    ];
    let payload = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..20),
        Just(b"nbase.tar\0\0".to_vec()),
        Just(b"n16384.tar\0/srv/ts\0".to_vec()),
        Just(b"nbase.tar.gz\0\0".to_vec()),
        Just(b"m".to_vec()),
        Just(b"dabc".to_vec()),
        Just([b'p', 0, 0, 0, 0, 0, 0, 1, 0].to_vec()),
        Just(b"p12".to_vec()),
    ];
    prop_oneof![
        3 => (0usize..5).prop_map(|n| BackendMessage::RowDescription(
            (0..n).map(|i| column(&format!("c{i}"))).collect()
        )),
        4 => proptest::collection::vec(text, 0..5).prop_map(|cells| BackendMessage::DataRow(
            cells.iter().map(|c| cell(c.as_deref())).collect()
        )),
        3 => Just(BackendMessage::CommandComplete { tag: "SELECT".into() }),
        3 => Just(copy_out()),
        6 => payload.prop_map(|p| BackendMessage::CopyData(Bytes::from(p))),
        3 => Just(BackendMessage::CopyDone),
        1 => Just(BackendMessage::ReadyForQuery { status: b'I' }),
        1 => Just(BackendMessage::ErrorResponse(DbError {
            severity: "ERROR".into(),
            code: "XX001".into(),
            message: "boom".into(),
            ..DbError::default()
        })),
        1 => Just(BackendMessage::NoticeResponse(DbError::default())),
        1 => Just(BackendMessage::EmptyQueryResponse),
        1 => Just(BackendMessage::CopyBothResponse(CopyResponse { format: 0, column_formats: vec![] })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_well_formed_response_yields_exactly_what_was_sent(backup in backup()) {
        let mut response = BackupResponse::new(backup.major, &backup.options());
        let (events, error) = run(&mut response, backup.messages());
        prop_assert!(error.is_none(), "{:?}", error);
        let mut archives: Vec<(String, Vec<u8>)> = Vec::new();
        let mut manifest: Option<Vec<u8>> = None;
        for event in &events {
            match event {
                BackupEvent::ArchiveStart(a) => {
                    prop_assert_eq!(a.compression, backup.compression);
                    archives.push((a.name.clone(), Vec::new()));
                }
                BackupEvent::ArchiveData(d) => archives.last_mut().unwrap().1.extend_from_slice(d),
                BackupEvent::ManifestStart => manifest = Some(Vec::new()),
                BackupEvent::ManifestData(d) => manifest.as_mut().unwrap().extend_from_slice(d),
                _ => {}
            }
        }
        prop_assert_eq!(archives.len(), backup.archives.len());
        for (index, ((name, got), sent)) in archives.iter().zip(&backup.archives).enumerate() {
            prop_assert_eq!(name, &backup.archive_name(index));
            prop_assert_eq!(got, &sent.concat());
        }
        prop_assert_eq!(manifest, backup.manifest.as_ref().map(|m| m.concat()));
        prop_assert_eq!(events.last(), Some(&BackupEvent::Done));
        prop_assert_eq!(response.tablespaces(), Some(&backup.list()[..]));
        prop_assert_eq!(response.end().map(|(lsn, _)| lsn.to_string()), Some("0/2000100".to_string()));
        let sent: u64 = backup.archives.iter().flatten().map(|c| c.len() as u64).sum();
        prop_assert_eq!(response.bytes_done(), sent);
    }

    #[test]
    fn arbitrary_messages_never_panic_and_keep_the_grammar(
        major in 13u32..=18,
        manifest in any::<bool>(),
        prefix_len in 0usize..12,
        messages in proptest::collection::vec(message(), 0..40),
    ) {
        // A valid opening (some of it) makes the later states reachable.
        let opening = Backup {
            major,
            tablespaces: vec![(16384, "/srv/ts".into())],
            archives: vec![vec![], vec![]],
            manifest: manifest.then(Vec::new),
            compression: None,
        };
        let mut all: Vec<BackendMessage> = opening.messages().into_iter().take(prefix_len).collect();
        all.extend(messages);
        let mut response = BackupResponse::new(major, &opening.options());
        run(&mut response, all);
    }

    #[test]
    fn a_damaged_response_is_refused_or_still_complete(
        backup in backup(),
        damage in 0u8..4,
        at in any::<prop::sample::Index>(),
        to in any::<prop::sample::Index>(),
        extra in message(),
    ) {
        let mut messages = backup.messages();
        let i = at.index(messages.len());
        match damage {
            0 => { messages.remove(i); }
            1 => { let m = messages[i].clone(); messages.insert(i, m); }
            2 => { let m = messages.remove(i); let j = to.index(messages.len() + 1); messages.insert(j, m); }
            _ => messages.insert(i, extra),
        }
        let mut response = BackupResponse::new(backup.major, &backup.options());
        let (events, error) = run(&mut response, messages);
        if error.is_none() && events.last() == Some(&BackupEvent::Done) {
            // Complete: every archive of the list, and the manifest when asked for.
            let archives = events.iter().filter(|e| matches!(e, BackupEvent::ArchiveStart(_))).count();
            prop_assert_eq!(archives, backup.archives.len());
            prop_assert_eq!(
                events.contains(&BackupEvent::ManifestStart),
                backup.manifest.is_some()
            );
        }
    }
}

/// The fuzz seeds of `backup_response` are a real PostgreSQL 15 server's answer to
/// BASE_BACKUP (data cut short) and the same re-framed as 13/14 send it: both must be
/// accepted to the end, with the archive and the manifest.
#[test]
fn the_captured_server_responses_are_accepted() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/backup_response");
    let mut seen = 0;
    for (name, major) in [("real_v15", 15), ("reframed_v14", 14)] {
        let seed = std::fs::read(dir.join(name)).unwrap();
        let (&selector, wire) = seed.split_first().unwrap();
        assert_eq!(13 + u32::from(selector & 7), major, "{name}");
        let mut buf = bytes::BytesMut::from(wire);
        let mut messages = Vec::new();
        let limits = pgwire_repl::proto::backend::DecodeLimits::default();
        while let Some(m) = pgwire_repl::proto::backend::decode(&mut buf, &limits).unwrap() {
            messages.push(m);
        }
        assert!(buf.is_empty(), "{name}: trailing bytes");
        let mut response = BackupResponse::new(major, &BackupOptions::default());
        let (events, error) = run(&mut response, messages);
        assert!(error.is_none(), "{name}: {error:?}");
        assert_eq!(events.last(), Some(&BackupEvent::Done), "{name}");
        assert!(events.contains(&BackupEvent::ManifestStart), "{name}");
        let archives: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                BackupEvent::ArchiveStart(a) => Some(a.name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(archives, ["base.tar"], "{name}");
        seen += 1;
    }
    assert_eq!(seen, 2);
}
