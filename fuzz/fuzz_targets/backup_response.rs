//! BASE_BACKUP's response state machine fed whatever a hostile server sends: arbitrary
//! bytes are framed into backend messages and handed to `BackupResponse::handle`. The
//! first byte picks the server version (13..18: both framings), whether a manifest was
//! asked for, and the server compression expected.
//!
//! It must never panic; the events must follow the grammar (start, tablespace list,
//! archives in the list's order with data only inside them, manifest only after every
//! archive, end, done); once failed it accepts nothing more, nor after `Done`.
#![no_main]

use basebackup::protocol::{BackupEvent, BackupResponse};
use basebackup::{BackupOptions, CompressionMethod, ManifestMode, ServerCompression, Tablespace};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire_repl::proto::backend::{decode, BackendMessage, DecodeLimits};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let major = 13 + u32::from(selector & 0x07) % 6;
    let mut options = BackupOptions::default();
    if selector & 0x08 != 0 {
        options.manifest = ManifestMode::No;
    }
    options.compression = match (selector >> 4) & 0x03 {
        1 => Some(ServerCompression::new(CompressionMethod::Gzip)),
        2 => Some(ServerCompression::new(CompressionMethod::Lz4)),
        3 => Some(ServerCompression::new(CompressionMethod::Zstd)),
        _ => None,
    };
    let manifest_expected = options.manifest != ManifestMode::No;
    let limits = DecodeLimits {
        max_short_message: 4096,
        max_long_message: 1 << 16,
    };
    let mut buf = BytesMut::from(rest);
    let mut machine = BackupResponse::new(major, &options);
    let mut grammar = Grammar::default();
    while let Ok(Some(message)) = decode(&mut buf, &limits) {
        let ignored = matches!(
            message,
            BackendMessage::NoticeResponse(_)
                | BackendMessage::ParameterStatus { .. }
                | BackendMessage::NotificationResponse { .. }
        );
        let finished = machine.is_done();
        match machine.handle(message) {
            Ok(events) => {
                assert!(
                    !finished || ignored,
                    "accepted a message after the end or an error"
                );
                for event in events {
                    grammar.feed(&event, manifest_expected);
                }
                assert_eq!(machine.is_done(), grammar.done);
            }
            Err(_) => {
                assert!(machine.is_failed() && machine.is_done());
                assert!(!grammar.done, "failed after Done");
                grammar.failed = true;
            }
        }
        if grammar.failed {
            // Once failed, it accepts nothing more.
            if let Ok(Some(next)) = decode(&mut buf, &limits) {
                let ignored = matches!(
                    next,
                    BackendMessage::NoticeResponse(_)
                        | BackendMessage::ParameterStatus { .. }
                        | BackendMessage::NotificationResponse { .. }
                );
                assert_eq!(
                    machine.handle(next).is_err(),
                    !ignored,
                    "accepted a message after an error"
                );
            }
            return;
        }
    }
});

#[derive(Default)]
struct Grammar {
    started: bool,
    tablespaces: Option<Vec<Tablespace>>,
    in_archive: bool,
    archives: usize,
    in_manifest: bool,
    ended: bool,
    done: bool,
    failed: bool,
}

impl Grammar {
    fn feed(&mut self, event: &BackupEvent, manifest_expected: bool) {
        assert!(!self.done, "an event after Done");
        let all_archives = self.tablespaces.as_ref().map(Vec::len) == Some(self.archives);
        match event {
            BackupEvent::Started { timeline, .. } => {
                assert!(!self.started && timeline.0 > 0);
                self.started = true;
            }
            BackupEvent::Tablespaces(list) => {
                assert!(self.started && self.tablespaces.is_none());
                assert!(
                    list.last().is_some_and(|t| t.oid.is_none()),
                    "no base directory last"
                );
                assert_eq!(list.iter().filter(|t| t.oid.is_none()).count(), 1);
                self.tablespaces = Some(list.clone());
            }
            BackupEvent::ArchiveStart(archive) => {
                let list = self
                    .tablespaces
                    .as_ref()
                    .expect("an archive before the list");
                assert!(!self.in_archive && !self.in_manifest && !self.ended);
                assert_eq!(
                    Some(&archive.tablespace),
                    list.get(self.archives),
                    "archive out of order"
                );
                assert!(!archive.name.contains('/') && !archive.name.starts_with('.'));
                self.archives += 1;
                self.in_archive = true;
            }
            BackupEvent::ArchiveData(_) => assert!(self.in_archive, "data outside an archive"),
            BackupEvent::Progress(_) => assert!(self.tablespaces.is_some() && !self.ended),
            BackupEvent::ArchiveEnd => {
                assert!(self.in_archive);
                self.in_archive = false;
            }
            BackupEvent::ManifestStart => {
                assert!(manifest_expected, "a manifest that was not asked for");
                assert!(!self.in_archive && !self.in_manifest && all_archives);
                self.in_manifest = true;
            }
            BackupEvent::ManifestData(_) => assert!(self.in_manifest),
            BackupEvent::Ended { .. } => {
                assert!(!self.in_archive && !self.ended && all_archives);
                assert_eq!(
                    self.in_manifest, manifest_expected,
                    "ended without the manifest"
                );
                self.ended = true;
            }
            BackupEvent::Done => {
                assert!(self.ended);
                self.done = true;
            }
        }
    }
}
