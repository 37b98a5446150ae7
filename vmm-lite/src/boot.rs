//! Guest memory layout and kernel boot: Linux 64-bit boot protocol (bzImage or ELF) and PVH.
//!
//! Layout of low memory (all below 1 MiB, in RAM the guest owns):
//!
//! | address | content |
//! |---|---|
//! | 0x500 | GDT (null, code32 0x08, code64 0x10, data 0x18, tss 0x20) |
//! | 0x6000 | PVH `hvm_start_info`, module list at 0x6040 |
//! | 0x7000 | Linux `boot_params` (zero page) or PVH memory map |
//! | 0x8ff0 | initial stack top |
//! | 0x9000 | PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories |
//! | 0x20000 | kernel command line |
//! | 0x9fc00 | MP floating pointer and configuration table (see [`crate::mptable`]) |
//!
//! The initial page tables identity-map the first 4 GiB with 2 MiB pages, so the MMIO window
//! at 0xd000_0000 is reachable from a 64-bit guest without its own tables.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Guest memory type used throughout the VMM.
pub type GuestMem = GuestMemoryMmap<()>;

/// Start of the MMIO hole below 4 GiB; RAM above it is relocated past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// PVH start_info address.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list address.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// Zero page (boot_params) or PVH memory map address.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 address.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory address (four follow).
pub const PD_ADDR: u64 = 0xb000;
/// Command line address.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line size, including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory reported in e820 (EBDA above).
pub const EBDA_START: u64 = 0x9fc00;
/// Smallest guest memory we accept.
pub const MIN_MEM_MIB: u32 = 2;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;

/// Errors while placing the kernel and boot structures.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel image {path}")]
    ReadKernel {
        /// Path given.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF nor a bzImage, or is truncated/corrupt.
    #[error("kernel image {path} is corrupt or not a supported format: {reason}")]
    CorruptKernel {
        /// Path given.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// Path given.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is empty.
    #[error("initrd {path} is empty")]
    EmptyInitrd {
        /// Path given.
        path: PathBuf,
    },
    /// The image does not fit into guest memory.
    #[error("guest memory too small: {what} needs memory up to {needed:#x} but the guest has {mem_mib} MiB (use a larger --mem-mib)")]
    MemoryTooSmall {
        /// What did not fit.
        what: &'static str,
        /// End address needed.
        needed: u64,
        /// Configured memory.
        mem_mib: u32,
    },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {mem_mib} MiB of guest memory")]
    AllocMemory {
        /// Requested size.
        mem_mib: u32,
        /// Underlying error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The MP table could not be built.
    #[error("cannot set up the MP table: {0}")]
    MpTable(String),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    WriteMemory {
        /// Which structure.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, BootError>;

/// Kernel image format detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// ELF (vmlinux or a tiny test guest).
    Elf,
    /// bzImage with a Linux setup header.
    BzImage,
}

/// What we learned about a kernel file before loading it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Format.
    pub format: ImageFormat,
    /// Whether it looks like a standard Linux kernel (banner or kernel_version present).
    pub is_linux: bool,
    /// Highest guest-physical address the image needs.
    pub needs_up_to: u64,
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// 64-bit Linux boot protocol: long mode, paging on, `rsi` = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, `rbx` = hvm_start_info.
    Pvh,
}

/// The result of loading: where to start and how.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// Entry point (guest physical).
    pub entry: u64,
    /// Entry mode.
    pub kind: EntryKind,
    /// boot_params (Linux64) or hvm_start_info (PVH) address.
    pub boot_info: u64,
}

/// Creates guest memory of `mem_mib` MiB, split around the MMIO hole when needed.
pub fn create_memory(mem_mib: u32) -> Result<GuestMem> {
    let size = u64::from(mem_mib) << 20;
    let ranges = if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    };
    GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| BootError::AllocMemory { mem_mib, source })
}

/// End of RAM below the MMIO hole.
fn low_mem_end(mem: &GuestMem) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&e| e <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

fn corrupt(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::CorruptKernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Inspects a kernel file: format, whether it is a standard Linux kernel, extent in memory.
///
/// A bzImage is judged from its first 64 KiB (setup header and `kernel_version` string); an
/// ELF is read whole (program headers, and the banner search that tells Linux apart).
pub fn inspect_kernel(path: &Path) -> Result<ImageInfo> {
    let rd = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(rd)?;
    let len = f.metadata().map_err(rd)?.len();
    let mut head = Vec::with_capacity(HEAD_BYTES as usize);
    (&mut f)
        .take(HEAD_BYTES)
        .read_to_end(&mut head)
        .map_err(rd)?;
    let mut banner = None;
    if head.starts_with(b"\x7fELF") {
        // Program headers past the head (unusual): read up to their end, bounded.
        if let (Some(phoff), Some(phnum)) = (u64_at(&head, 0x20), u16_at(&head, 0x38)) {
            let end = phoff
                .saturating_add(u64::from(phnum) * 56)
                .min(len)
                .min(MAX_ELF_HEADERS);
            if end > head.len() as u64 {
                (&mut f)
                    .take(end - head.len() as u64)
                    .read_to_end(&mut head)
                    .map_err(rd)?;
            }
        }
        f.rewind().map_err(rd)?;
        banner = Some(stream_contains(&mut f, b"Linux version ").map_err(rd)?);
    }
    inspect_image(path, &head, len, banner)
}

/// How much of a kernel file is read to judge it (a bzImage's setup header and version
/// string, an ELF's headers). The rest is never held in memory: a VMM that read a 17 MB
/// vmlinux into a buffer kept megabytes of freed heap resident for its whole life.
const HEAD_BYTES: u64 = 64 * 1024;
/// Bound on an ELF's header bytes read for [`inspect_kernel`].
const MAX_ELF_HEADERS: u64 = 1 << 20;

/// Whether `needle` occurs in what `r` yields, read in fixed chunks.
fn stream_contains(r: &mut impl Read, needle: &[u8]) -> std::io::Result<bool> {
    let keep = needle.len().saturating_sub(1);
    let mut buf = vec![0u8; 256 * 1024];
    let mut have = 0usize;
    loop {
        let n = match r.read(&mut buf[have..]) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        have += n;
        if contains(&buf[..have], needle) {
            return Ok(true);
        }
        // Carry the tail that could start a match across the chunk boundary.
        let tail = have.min(keep);
        buf.copy_within(have - tail..have, 0);
        have = tail;
    }
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(off..off + 8)?.try_into().ok()?))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut i = 0;
    while let Some(p) = hay[i..].iter().position(|&b| b == first) {
        let at = i + p;
        if hay.get(at + 1..at + 1 + rest.len()) == Some(rest) {
            return true;
        }
        i = at + 1;
    }
    false
}

/// Like [`inspect_kernel`] on bytes already read.
pub fn inspect_kernel_bytes(path: &Path, d: &[u8]) -> Result<ImageInfo> {
    inspect_image(path, d, d.len() as u64, None)
}

/// `d` holds the start of the file (with an ELF's program headers); `file_len` is its full
/// length; `banner` whether the whole file holds Linux's banner (searched in `d` if None).
fn inspect_image(path: &Path, d: &[u8], file_len: u64, banner: Option<bool>) -> Result<ImageInfo> {
    if d.is_empty() {
        return Err(corrupt(path, "the file is empty"));
    }
    if d.starts_with(b"\x7fELF") {
        if d.get(4) != Some(&2) {
            return Err(corrupt(path, "only 64-bit ELF images are supported"));
        }
        let phoff = u64_at(d, 0x20).ok_or_else(|| corrupt(path, "truncated ELF header"))?;
        let phentsize = u16_at(d, 0x36).ok_or_else(|| corrupt(path, "truncated ELF header"))?;
        let phnum = u16_at(d, 0x38).ok_or_else(|| corrupt(path, "truncated ELF header"))?;
        if phentsize != 56 || phnum == 0 {
            return Err(corrupt(path, "ELF has no valid program headers"));
        }
        let mut needs = 0u64;
        let mut loads = 0;
        for i in 0..u64::from(phnum) {
            let off = usize::try_from(phoff + i * 56).map_err(|_| corrupt(path, "bad phoff"))?;
            let p_type =
                u32_at(d, off).ok_or_else(|| corrupt(path, "truncated program headers"))?;
            if p_type != 1 {
                continue;
            }
            let p_offset = u64_at(d, off + 8).unwrap_or(u64::MAX);
            let p_paddr = u64_at(d, off + 24).unwrap_or(u64::MAX);
            let p_filesz = u64_at(d, off + 32).unwrap_or(u64::MAX);
            let p_memsz = u64_at(d, off + 40).unwrap_or(u64::MAX);
            if p_filesz == 0 {
                continue;
            }
            if p_offset.checked_add(p_filesz).is_none_or(|e| e > file_len) {
                return Err(corrupt(
                    path,
                    "an ELF segment extends past the end of the file",
                ));
            }
            let end = p_paddr
                .checked_add(p_memsz.max(p_filesz))
                .ok_or_else(|| corrupt(path, "ELF segment address overflows"))?;
            needs = needs.max(end);
            loads += 1;
        }
        if loads == 0 {
            return Err(corrupt(path, "ELF has no loadable segments"));
        }
        Ok(ImageInfo {
            format: ImageFormat::Elf,
            is_linux: banner.unwrap_or_else(|| contains(d, b"Linux version ")),
            needs_up_to: needs,
        })
    } else if u32_at(d, 0x202) == Some(KERNEL_HDR_MAGIC) {
        let setup_sects = match d[0x1f1] {
            0 => 4,
            n => n as u64,
        };
        let setup_size = (setup_sects + 1) * 512;
        if file_len <= setup_size {
            return Err(corrupt(
                path,
                "bzImage is truncated (no protected-mode kernel)",
            ));
        }
        let payload = file_len - setup_size;
        // syssize (boot protocol 2.04+): the protected-mode kernel's size in 16-byte units.
        // A file shorter than that would boot into zeroed memory and triple-fault.
        let syssize = u32_at(d, 0x1f4).map_or(0, |p| u64::from(p) * 16);
        if payload < syssize {
            return Err(corrupt(
                path,
                &format!(
                    "bzImage is truncated (the header promises a {syssize}-byte protected-mode kernel, the file holds {payload} bytes of it)"
                ),
            ));
        }
        let init_size = u32_at(d, 0x260).map(u64::from).unwrap_or(0);
        let kver = u16_at(d, 0x20e).unwrap_or(0);
        // A standard kernel points kernel_version at a "X.Y.Z ..." string in the setup code.
        let is_linux = kver != 0
            && d.get(kver as usize + 0x200)
                .is_some_and(|c| c.is_ascii_digit());
        Ok(ImageInfo {
            format: ImageFormat::BzImage,
            is_linux,
            needs_up_to: HIMEM_START + payload.max(init_size),
        })
    } else {
        Err(corrupt(
            path,
            "neither an ELF (no \\x7fELF magic) nor a bzImage (no HdrS setup header)",
        ))
    }
}

/// Everything needed to load a guest.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// Kernel path.
    pub kernel: &'a Path,
    /// Pre-inspected image info.
    pub info: &'a ImageInfo,
    /// Optional initrd.
    pub initrd: Option<&'a Path>,
    /// The full command line.
    pub cmdline: &'a str,
    /// Configured memory, for error messages.
    pub mem_mib: u32,
    /// vCPU count, for the MP table.
    pub vcpus: u8,
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::WriteMemory { what, source }
}

/// Loads the kernel, initrd, command line, page tables, GDT and boot info into `mem`.
pub fn load(mem: &GuestMem, spec: &BootSpec) -> Result<BootEntry> {
    let mem_end = low_mem_end(mem);
    if spec.info.needs_up_to > mem_end {
        return Err(BootError::MemoryTooSmall {
            what: "the kernel image",
            needed: spec.info.needs_up_to,
            mem_mib: spec.mem_mib,
        });
    }
    let mut file = File::open(spec.kernel).map_err(|source| BootError::ReadKernel {
        path: spec.kernel.to_path_buf(),
        source,
    })?;
    let (kernel_end, entry, kind, hdr) = match spec.info.format {
        ImageFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| corrupt(spec.kernel, format!("ELF load failed: {e}")))?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => {
                    (r.kernel_end, a.raw_value(), EntryKind::Pvh, None)
                }
                _ => (
                    r.kernel_end,
                    r.kernel_load.raw_value(),
                    EntryKind::Linux64,
                    None,
                ),
            }
        }
        ImageFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| corrupt(spec.kernel, format!("bzImage load failed: {e}")))?;
            // 64-bit entry point of the protected-mode kernel is 0x200 past its start.
            (
                r.kernel_end,
                r.kernel_load.raw_value() + 0x200,
                EntryKind::Linux64,
                r.setup_header,
            )
        }
    };

    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end, hdr.as_ref(), spec.mem_mib)?),
        None => None,
    };

    let cmdline_bytes = spec.cmdline.as_bytes();
    let max = hdr
        .filter(|h| h.version >= 0x0206 && h.cmdline_size > 0)
        .map(|h| h.cmdline_size as usize + 1)
        .unwrap_or(CMDLINE_MAX)
        .min(CMDLINE_MAX);
    if cmdline_bytes.len() + 1 > max {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the limit is {}",
            cmdline_bytes.len(),
            max - 1
        )));
    }
    if cmdline_bytes.contains(&0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    mem.write_slice(cmdline_bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(write_err("command line"))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline_bytes.len() as u64))
        .map_err(write_err("command line"))?;

    write_gdt(mem)?;
    write_page_tables(mem)?;
    crate::mptable::setup(mem, spec.vcpus).map_err(|e| BootError::MpTable(e.to_string()))?;

    let boot_info = match kind {
        EntryKind::Linux64 => {
            write_boot_params(mem, hdr, cmdline_bytes.len(), initrd)?;
            ZERO_PAGE_ADDR
        }
        EntryKind::Pvh => {
            write_pvh_info(mem, initrd)?;
            PVH_INFO_ADDR
        }
    };
    Ok(BootEntry {
        entry,
        kind,
        boot_info,
    })
}

fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
    hdr: Option<&setup_header>,
    mem_mib: u32,
) -> Result<(u64, u64)> {
    let rd = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(rd)?;
    let size = f.seek(SeekFrom::End(0)).map_err(rd)?;
    f.rewind().map_err(rd)?;
    if size == 0 {
        return Err(BootError::EmptyInitrd {
            path: path.to_path_buf(),
        });
    }
    let mut top = low_mem_end(mem);
    if let Some(h) = hdr {
        if h.initrd_addr_max != 0 {
            top = top.min(u64::from(h.initrd_addr_max) + 1);
        }
    }
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(HIMEM_START) => a,
        _ => {
            return Err(BootError::MemoryTooSmall {
                what: "the kernel plus initrd",
                needed: kernel_end + size,
                mem_mib,
            })
        }
    };
    // Straight from the file into guest memory: no buffer of the initrd's size (which, once
    // freed, glibc would keep resident in the VMM's heap).
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(write_err("initrd"))?;
    Ok((addr, size))
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// GDT entries written at [`GDT_ADDR`].
pub const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0xc09b, 0, 0xfffff), // 0x08: code, 32-bit
    (0xa09b, 0, 0xfffff), // 0x10: code, 64-bit
    (0xc093, 0, 0xfffff), // 0x18: data
    (0x808b, 0, 0xfffff), // 0x20: TSS
];

/// Encoded GDT entry by index.
pub fn gdt_raw(i: usize) -> u64 {
    let (f, b, l) = GDT[i];
    gdt_entry(f, b, l)
}

fn write_gdt(mem: &GuestMem) -> Result<()> {
    for i in 0..GDT.len() {
        mem.write_obj(gdt_raw(i), GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(write_err("GDT"))?;
    }
    Ok(())
}

fn write_page_tables(mem: &GuestMem) -> Result<()> {
    let w = write_err("page tables");
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(w)?;
    let mut pd = vec![0u8; 4 * 4096];
    for i in 0..4u64 {
        mem.write_obj(
            (PD_ADDR + i * 0x1000) | 0x3,
            GuestAddress(PDPT_ADDR + i * 8),
        )
        .map_err(write_err("page tables"))?;
        for j in 0..512u64 {
            let entry = ((i * 512 + j) << 21) | 0x83;
            let off = ((i * 512 + j) * 8) as usize;
            pd[off..off + 8].copy_from_slice(&entry.to_le_bytes());
        }
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(write_err("page tables"))
}

/// RAM ranges for e820 / the PVH memmap: (addr, size, type).
fn memory_map(mem: &GuestMem) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    map.push((EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED));
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        let end = start + r.len();
        let s = start.max(HIMEM_START);
        if end > s {
            map.push((s, end - s, E820_RAM));
        }
    }
    map
}

fn write_boot_params(
    mem: &GuestMem,
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(write_err("boot_params"))
}

fn write_pvh_info(mem: &GuestMem, initrd: Option<(u64, u64)>) -> Result<()> {
    let map = memory_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(ZERO_PAGE_ADDR + 24 * i as u64))
            .map_err(write_err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: ZERO_PAGE_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(write_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(write_err("PVH start_info"))
}

/// Composes the kernel command line: VMM defaults, virtio-mmio devices, then the user's.
pub fn compose_cmdline(
    user: Option<&str>,
    virtio: &[(u64, u64, u32)],
) -> std::result::Result<String, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let base = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux";
    c.insert_str(base)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    for (i, (base, size, irq)) in virtio.iter().enumerate() {
        c.add_virtio_mmio_device(*size, GuestAddress(*base), *irq, Some(i as u32))
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    if let Some(u) = user.filter(|u| !u.trim().is_empty()) {
        c.insert_str(u.trim())
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    c.as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .into_string()
        .map_err(|e| BootError::Cmdline(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_is_found_across_read_chunks_without_reading_the_file_whole() {
        let needle = b"Linux version ";
        for at in [
            0usize,
            100,
            256 * 1024 - 5,
            256 * 1024 - 1,
            256 * 1024,
            600_000,
        ] {
            let mut data = vec![0u8; 700_000];
            data[at..at + needle.len()].copy_from_slice(needle);
            let found = stream_contains(&mut std::io::Cursor::new(&data), needle).unwrap();
            assert!(found, "banner at {at}");
        }
        let data = vec![b'L'; 700_000];
        assert!(!stream_contains(&mut std::io::Cursor::new(&data), needle).unwrap());
    }

    #[test]
    fn rejects_garbage_and_empty() {
        let p = Path::new("k");
        assert!(matches!(
            inspect_kernel_bytes(p, b""),
            Err(BootError::CorruptKernel { .. })
        ));
        let e = inspect_kernel_bytes(p, &[0x55u8; 4096]).unwrap_err();
        assert!(e.to_string().contains("neither an ELF"), "{e}");
        let mut elf = b"\x7fELF\x02".to_vec();
        elf.resize(20, 0);
        assert!(inspect_kernel_bytes(p, &elf).is_err());
    }

    /// A minimal ELF64 with one PT_LOAD of 16 file bytes at 1 MiB and `memsz` in memory.
    fn tiny_elf(memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56 + 16];
        e[0..5].copy_from_slice(b"\x7fELF\x02");
        e[5] = 1; // little endian
        e[6] = 1;
        e[0x10] = 2; // ET_EXEC
        e[0x12] = 62; // x86-64
        e[0x18..0x20].copy_from_slice(&HIMEM_START.to_le_bytes()); // e_entry
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&memsz.to_le_bytes()); // p_memsz
        e
    }

    #[test]
    fn an_elf_bigger_than_the_head_read_is_judged_from_the_file() {
        // A vmlinux is megabytes: only its head is read, the banner is streamed, and
        // segments are checked against the file's length (not the head's).
        let dir = std::env::temp_dir().join(format!("vmm-lite-bigelf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut e = tiny_elf(1 << 20);
        let filesz: u64 = 300 * 1024;
        e[64 + 32..64 + 40].copy_from_slice(&filesz.to_le_bytes());
        e.resize(120 + filesz as usize, 0);
        let at = e.len() - 1000;
        e[at..at + 14].copy_from_slice(b"Linux version ");
        let k = dir.join("vmlinux");
        std::fs::write(&k, &e).unwrap();
        let info = inspect_kernel(&k).unwrap();
        assert!(info.is_linux, "the banner past the head was found");
        std::fs::write(&k, &e[..e.len() - 1]).unwrap();
        let err = inspect_kernel(&k).unwrap_err().to_string();
        assert!(err.contains("extends past the end of the file"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn elf_larger_than_memory_is_refused_before_loading() {
        let dir = std::env::temp_dir().join(format!("vmm-lite-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("big.elf");
        std::fs::write(&k, tiny_elf(8 << 20)).unwrap();
        let info = inspect_kernel(&k).unwrap();
        assert_eq!(info.format, ImageFormat::Elf);
        assert!(!info.is_linux);
        assert_eq!(info.needs_up_to, HIMEM_START + (8 << 20));
        let mem = create_memory(4).unwrap();
        let spec = BootSpec {
            kernel: &k,
            info: &info,
            initrd: None,
            cmdline: "x",
            mem_mib: 4,
            vcpus: 1,
        };
        let e = load(&mem, &spec).unwrap_err();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
        // The same image with a small memsz loads and enters through the 64-bit protocol.
        std::fs::write(&k, tiny_elf(16)).unwrap();
        let info = inspect_kernel(&k).unwrap();
        let entry = load(
            &mem,
            &BootSpec {
                info: &info,
                ..spec
            },
        )
        .unwrap();
        assert_eq!(entry.kind, EntryKind::Linux64);
        assert_eq!(entry.entry, HIMEM_START);
        assert_eq!(entry.boot_info, ZERO_PAGE_ADDR);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn elf_segment_past_end_of_file_is_corrupt() {
        let mut e = tiny_elf(16);
        e.truncate(125);
        let err = inspect_kernel_bytes(Path::new("k"), &e).unwrap_err();
        assert!(
            err.to_string().contains("past the end of the file"),
            "{err}"
        );
    }

    #[test]
    fn banner_search() {
        assert!(contains(b"xxLinux version 6", b"Linux version "));
        assert!(contains(b"LLinux version ", b"Linux version "));
        assert!(!contains(b"Linux versio", b"Linux version "));
        assert!(!contains(b"", b"L"));
    }

    #[test]
    fn cmdline_has_virtio_entries() {
        let c = compose_cmdline(Some("foo=bar"), &[(0xd000_1000, 0x1000, 5)]).unwrap();
        assert!(c.contains("virtio_mmio.device=4K@0xd0001000:5:0"), "{c}");
        assert!(c.ends_with("foo=bar"), "{c}");
    }

    #[test]
    fn memory_split_around_hole() {
        let m = create_memory(16).unwrap();
        assert_eq!(low_mem_end(&m), 16 << 20);
        let map = memory_map(&m);
        assert_eq!(
            map.last().unwrap(),
            &(HIMEM_START, (16 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn gdt_encoding_matches_known_values() {
        assert_eq!(gdt_raw(2), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_raw(3), 0x00cf_9300_0000_ffff);
    }
}
