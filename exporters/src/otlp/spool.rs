//! The on-disk spool: encoded requests that could not be delivered, one file each, waiting
//! for the backend to come back (or for the agent to restart).
//!
//! Layout: `{dir}/{signal}/{seq:020}-{records}.pb`, the request body uncompressed. `seq`
//! only grows (continuing after the highest file found at open), so name order is age
//! order. A file is written under `.tmp` and renamed, so a crash never leaves a partial
//! `.pb`; `.tmp` leftovers are deleted at open. The total size is bounded: making room
//! deletes the oldest files, and the caller counts their records as dropped.
//!
//! One spool directory belongs to one exporter at a time.

use super::Signal;
use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool directory could not be created.
    #[error("create spool directory `{}`", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    /// The spool directory could not be listed.
    #[error("list spool directory `{}`", .0.display())]
    List(PathBuf, #[source] std::io::Error),
    /// A request could not be written.
    #[error("write spool file `{}`", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// A spooled request could not be read.
    #[error("read spool file `{}`", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// A spooled request could not be deleted.
    #[error("delete spool file `{}`", .0.display())]
    Remove(PathBuf, #[source] std::io::Error),
}

/// One spooled request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) records: u64,
    pub(crate) bytes: u64,
    /// The file name as found (a previous build may have padded differently).
    name: String,
}

/// What [`Spool::push`] did.
#[derive(Debug)]
pub(crate) enum Pushed {
    /// Stored; `evicted` records of older requests were deleted to make room.
    Stored {
        /// Records deleted to make room (to be counted as dropped).
        evicted: u64,
    },
    /// The body alone is larger than the spool; nothing stored or deleted.
    TooLarge,
    /// The write failed; nothing stored, but `evicted` records were deleted first.
    Failed {
        /// Records deleted to make room (to be counted as dropped).
        evicted: u64,
        /// Why the write failed.
        err: SpoolError,
    },
}

/// The spool of one signal. Not shared: the export task owns it.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    next_seq: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
    records: u64,
}

/// `{seq}-{records}.pb` → (seq, records).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".pb")?;
    let (seq, records) = stem.split_once('-')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if records.is_empty() || !records.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((seq.parse().ok()?, records.parse().ok()?))
}

fn file_name(seq: u64, records: u64) -> String {
    format!("{seq:020}-{records}.pb")
}

impl Spool {
    /// Open (creating, mode 0700) `{base}/{signal}/`; index the requests a previous run
    /// left, delete `.tmp` leftovers, skip names that do not parse (with a warning).
    pub(crate) fn open(base: &Path, signal: Signal, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir = base.join(signal.name());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SpoolError::CreateDir(dir.clone(), e))?;
        let mut entries = Vec::new();
        let list = fs::read_dir(&dir).map_err(|e| SpoolError::List(dir.clone(), e))?;
        for ent in list {
            let ent = ent.map_err(|e| SpoolError::List(dir.clone(), e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                eprintln!(
                    "sandscope: OTLP spool: skipping `{}` (not a spool file name)",
                    ent.path().display()
                );
                continue;
            };
            if name.ends_with(".tmp") {
                // A write interrupted by a crash: never renamed, so never counted.
                if let Err(e) = fs::remove_file(ent.path()) {
                    eprintln!(
                        "sandscope: OTLP spool: cannot delete leftover `{}`: {e}",
                        ent.path().display()
                    );
                }
                continue;
            }
            let meta = match ent.metadata() {
                Ok(m) if m.is_file() => m,
                _ => {
                    eprintln!(
                        "sandscope: OTLP spool: skipping `{}` (not a file)",
                        ent.path().display()
                    );
                    continue;
                }
            };
            let Some((seq, records)) = parse_name(name) else {
                eprintln!(
                    "sandscope: OTLP spool: skipping `{}` (not a spool file name)",
                    ent.path().display()
                );
                continue;
            };
            entries.push(Entry {
                seq,
                records,
                bytes: meta.len(),
                name: name.to_string(),
            });
        }
        entries.sort_by_key(|e| e.seq);
        let next_seq = entries.last().map(|e| e.seq.saturating_add(1)).unwrap_or(0);
        Ok(Self {
            bytes: entries.iter().map(|e| e.bytes).sum(),
            records: entries.iter().map(|e| e.records).sum(),
            entries: entries.into(),
            dir,
            max_bytes,
            next_seq,
        })
    }

    fn path(&self, e: &Entry) -> PathBuf {
        self.dir.join(&e.name)
    }

    /// Records waiting.
    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    /// Bytes waiting.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True when nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The oldest request, if any.
    #[cfg(test)]
    pub(crate) fn oldest(&self) -> Option<&Entry> {
        self.entries.front()
    }

    /// The body of the oldest request.
    pub(crate) fn read_oldest(&self) -> Option<Result<Vec<u8>, SpoolError>> {
        let e = self.entries.front()?;
        let p = self.path(e);
        Some(fs::read(&p).map_err(|err| SpoolError::Read(p, err)))
    }

    /// Forget the oldest request and delete its file; its record count. The index entry
    /// goes even when the delete fails (the error says so; the file would be replayed
    /// again by a later run).
    pub(crate) fn pop_oldest(&mut self) -> Option<(u64, Result<(), SpoolError>)> {
        let e = self.entries.pop_front()?;
        self.bytes -= e.bytes;
        self.records -= e.records;
        let p = self.path(&e);
        let r = match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(SpoolError::Remove(p, err)),
        };
        Some((e.records, r))
    }

    /// Store one request body of `records` records, first deleting the oldest requests
    /// until it fits in `max_bytes`.
    pub(crate) fn push(&mut self, body: &[u8], records: u64) -> Pushed {
        let len = body.len() as u64;
        if len > self.max_bytes {
            return Pushed::TooLarge;
        }
        let mut evicted = 0;
        let mut first_err = None;
        while self.bytes + len > self.max_bytes {
            let Some((r, res)) = self.pop_oldest() else {
                break;
            };
            evicted += r;
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            eprintln!("sandscope: OTLP spool: {e}");
        }
        let seq = self.next_seq;
        let name = file_name(seq, records);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let dst = self.dir.join(&name);
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(body)?;
            f.sync_all()?;
            fs::rename(&tmp, &dst)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Pushed::Failed {
                evicted,
                err: SpoolError::Write(dst, e),
            };
        }
        self.next_seq = seq.saturating_add(1);
        self.entries.push_back(Entry {
            seq,
            records,
            bytes: len,
            name,
        });
        self.bytes += len;
        self.records += records;
        Pushed::Stored { evicted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(s: &Spool) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&s.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn names_parse_only_when_well_formed() {
        assert_eq!(file_name(7, 100), "00000000000000000007-100.pb");
        assert_eq!(parse_name("00000000000000000007-100.pb"), Some((7, 100)));
        assert_eq!(parse_name(&file_name(u64::MAX, 0)), Some((u64::MAX, 0)));
        for junk in [
            "7.pb",
            "-3.pb",
            "7-.pb",
            "7-3",
            "7-3.pb.tmp",
            "a-3.pb",
            "7-x.pb",
            "7-+3.pb",
            "99999999999999999999999-1.pb",
            "README",
        ] {
            assert_eq!(parse_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn requests_are_stored_oldest_first_in_a_private_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), Signal::Traces, 1000).unwrap();
        let dir = d.path().join("traces");
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(s.is_empty());
        assert!(matches!(s.push(b"one", 1), Pushed::Stored { evicted: 0 }));
        assert!(matches!(s.push(b"two!", 20), Pushed::Stored { evicted: 0 }));
        assert_eq!((s.records(), s.bytes()), (21, 7));
        assert_eq!(
            names(&s),
            ["00000000000000000000-1.pb", "00000000000000000001-20.pb"]
        );
        assert_eq!(s.read_oldest().unwrap().unwrap(), b"one");
        assert_eq!(s.pop_oldest().map(|(r, e)| (r, e.is_ok())), Some((1, true)));
        assert_eq!(s.oldest().map(|e| e.seq), Some(1));
        assert_eq!(s.read_oldest().unwrap().unwrap(), b"two!");
        assert_eq!(s.pop_oldest().map(|(r, _)| r), Some(20));
        assert!(s.pop_oldest().is_none());
        assert!(s.read_oldest().is_none());
        assert_eq!((s.records(), s.bytes()), (0, 0));
        assert!(names(&s).is_empty());
        // Numbering goes on after the files are gone (within one run).
        assert!(matches!(s.push(b"3", 3), Pushed::Stored { .. }));
        assert_eq!(names(&s), ["00000000000000000002-3.pb"]);
    }

    #[test]
    fn a_full_spool_evicts_the_oldest_and_reports_their_records() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), Signal::Logs, 10).unwrap();
        assert!(matches!(s.push(&[0; 4], 4), Pushed::Stored { evicted: 0 }));
        assert!(matches!(s.push(&[1; 4], 5), Pushed::Stored { evicted: 0 }));
        // 8 + 4 > 10: the oldest (4 records) goes.
        assert!(matches!(s.push(&[2; 4], 6), Pushed::Stored { evicted: 4 }));
        assert_eq!((s.records(), s.bytes()), (11, 8));
        // 8 + 10 > 10: both go.
        assert!(matches!(
            s.push(&[3; 10], 7),
            Pushed::Stored { evicted: 11 }
        ));
        assert_eq!((s.records(), s.bytes()), (7, 10));
        assert_eq!(names(&s), ["00000000000000000003-7.pb"]);
        // Larger than the whole spool: refused, nothing evicted.
        assert!(matches!(s.push(&[4; 11], 8), Pushed::TooLarge));
        assert_eq!((s.records(), s.bytes()), (7, 10));
        assert_eq!(names(&s), ["00000000000000000003-7.pb"]);
    }

    #[test]
    fn a_restart_finds_what_was_left_cleans_tmp_files_and_skips_junk() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(d.path(), Signal::Metrics, 1000).unwrap();
            for i in 0..3u8 {
                assert!(matches!(
                    s.push(&[i; 5], 10 + u64::from(i)),
                    Pushed::Stored { .. }
                ));
            }
        }
        let dir = d.path().join("metrics");
        // A crash mid-write, and things that are not ours.
        fs::write(dir.join("00000000000000000003-50.pb.tmp"), b"half").unwrap();
        fs::write(dir.join("notes.txt"), b"x").unwrap();
        fs::write(dir.join("12-x.pb"), b"x").unwrap();
        fs::create_dir(dir.join("00000000000000000009-1.pb")).unwrap();
        let mut s = Spool::open(d.path(), Signal::Metrics, 1000).unwrap();
        assert_eq!((s.records(), s.bytes()), (10 + 11 + 12, 15));
        assert!(!dir.join("00000000000000000003-50.pb.tmp").exists());
        assert!(dir.join("notes.txt").exists(), "junk is left alone");
        assert_eq!(s.oldest().map(|e| (e.seq, e.records)), Some((0, 10)));
        assert!(matches!(s.push(b"new", 1), Pushed::Stored { .. }));
        assert!(
            dir.join("00000000000000000003-1.pb").exists(),
            "after seq 2"
        );
        let mut order = Vec::new();
        while let Some(b) = s.read_oldest() {
            order.push(b.unwrap());
            s.pop_oldest();
        }
        assert_eq!(order, [vec![0; 5], vec![1; 5], vec![2; 5], b"new".to_vec()]);
    }

    #[test]
    fn numbering_sorts_numerically_beyond_name_width() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("logs");
        fs::create_dir_all(&dir).unwrap();
        // Written by hand without padding: order must follow the number, not the name.
        fs::write(dir.join("10-1.pb"), b"b").unwrap();
        fs::write(dir.join("9-2.pb"), b"a").unwrap();
        let s = Spool::open(d.path(), Signal::Logs, 100).unwrap();
        assert_eq!(s.read_oldest().unwrap().unwrap(), b"a");
        assert_eq!(s.records(), 3);
        assert_eq!(s.next_seq, 11);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            Spool::open(&file, Signal::Logs, 10),
            Err(SpoolError::CreateDir(..))
        ));
    }
}
