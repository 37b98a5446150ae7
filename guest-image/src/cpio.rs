//! A writer for the `newc` cpio format (the Linux initramfs format), and a small reader
//! used to check archives.
//!
//! Each entry is a 110-byte ASCII header (`070701`, then 13 eight-digit hex fields), the
//! NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The archive
//! ends with an entry named `TRAILER!!!`. Timestamps are written as 0 and inode numbers
//! are assigned in order, so the same inputs always give the same bytes.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

/// File type bits (`st_mode & S_IFMT`).
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with this content.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// One archive member, as read back by [`read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub name: String,
    /// Permission bits (0o7777 part of the mode).
    pub perm: u32,
    /// What it is.
    pub kind: Kind,
}

/// Streams entries in `newc` format to a writer.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// Start an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Add a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, 0, 0, &[])
    }

    /// Add a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    /// Add a symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// Add a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, major, minor, &[])
    }

    /// Write the trailer and return the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev_major: u32,
        rdev_minor: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio: bad member name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio: {name} is larger than 4 GiB"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, namesize, 0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        pad4(&mut header);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        let pad = (4 - data.len() % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += (header.len() + data.len() + pad) as u64;
        Ok(())
    }
}

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// Why bytes are not a valid `newc` archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    /// The archive ends inside an entry.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A header does not start with `070701`.
    #[error("bad magic at byte {0} (not a newc cpio archive)")]
    BadMagic(usize),
    /// A header field is not hex.
    #[error("bad header field at byte {0}")]
    BadField(usize),
    /// A name is not UTF-8 or not NUL-terminated.
    #[error("bad member name at byte {0}")]
    BadName(usize),
    /// No trailer entry.
    #[error("no TRAILER!!! entry")]
    NoTrailer,
}

/// Parse an archive (up to its trailer) into entries.
pub fn read(bytes: &[u8]) -> Result<Vec<Entry>, ReadError> {
    let mut pos = 0usize;
    let mut entries = Vec::new();
    loop {
        if pos == bytes.len() {
            return Err(ReadError::NoTrailer);
        }
        let h = bytes
            .get(pos..pos + HEADER_LEN)
            .ok_or(ReadError::Truncated(pos))?;
        if &h[..6] != MAGIC {
            return Err(ReadError::BadMagic(pos));
        }
        let field = |i: usize| -> Result<u32, ReadError> {
            let s = std::str::from_utf8(&h[6 + i * 8..6 + (i + 1) * 8])
                .map_err(|_| ReadError::BadField(pos))?;
            u32::from_str_radix(s, 16).map_err(|_| ReadError::BadField(pos))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let (major, minor) = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_start = pos + HEADER_LEN;
        let raw = bytes
            .get(name_start..name_start + namesize)
            .ok_or(ReadError::Truncated(name_start))?;
        let (last, name) = raw.split_last().ok_or(ReadError::BadName(name_start))?;
        if *last != 0 {
            return Err(ReadError::BadName(name_start));
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| ReadError::BadName(name_start))?
            .to_string();
        let data_start = (name_start + namesize).next_multiple_of(4);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or(ReadError::Truncated(data_start))?;
        pos = (data_start + size).next_multiple_of(4);
        if name == TRAILER {
            return Ok(entries);
        }
        let kind = match mode & 0o170000 {
            S_IFDIR => Kind::Dir,
            S_IFLNK => Kind::Symlink(String::from_utf8_lossy(data).into_owned()),
            S_IFCHR => Kind::CharDev(major, minor),
            _ => Kind::File(data.to_vec()),
        };
        entries.push(Entry {
            name,
            perm: mode & 0o7777,
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let e = read(&bytes).unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "empty", "bin/sh"]);
        assert_eq!(e[1].kind, Kind::CharDev(5, 1));
        assert_eq!(e[1].perm, 0o600);
        assert_eq!(e[2].kind, Kind::File(b"#!/bin/sh\necho hi\n".to_vec()));
        assert_eq!(e[2].perm, 0o755);
        assert_eq!(e[4].kind, Kind::Symlink("busybox".into()));
    }

    #[test]
    fn header_layout_is_newc() {
        let bytes = sample();
        // First header: magic, ino 1, mode dir|0755.
        assert_eq!(&bytes[..14], b"07070100000001");
        assert_eq!(&bytes[14..22], b"000041ed");
        // Name "dev\0" right after the header, padded to 4 bytes (110 + 4 = 114 → 116).
        assert_eq!(&bytes[110..114], b"dev\0");
        assert_eq!(&bytes[116..122], MAGIC);
        assert!(bytes.ends_with(&[0u8; 0]));
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn deterministic() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn reader_rejects_garbage() {
        assert_eq!(read(b""), Err(ReadError::NoTrailer));
        assert_eq!(read(b"070701"), Err(ReadError::Truncated(0)));
        assert_eq!(read(&[b'x'; 200]), Err(ReadError::BadMagic(0)));
        let mut b = sample();
        b.truncate(b.len() - 40);
        assert!(matches!(read(&b), Err(ReadError::Truncated(_))));
        let mut b = sample();
        b[16] = b'z';
        assert_eq!(read(&b), Err(ReadError::BadField(0)));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
    }

    /// busybox's cpio (a second implementation) lists what we wrote.
    #[test]
    fn busybox_cpio_lists_the_archive() {
        let Some(bb) = crate::find_busybox() else {
            eprintln!("SKIPPED: busybox-static not installed (scripts/guest-deps installs it)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, sample()).unwrap();
        let out = std::process::Command::new(bb)
            .args(["cpio", "-t", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        for n in ["dev/console", "init", "empty", "bin/sh"] {
            assert!(list.lines().any(|l| l == n), "{n} missing from {list}");
        }
    }
}
