//! A minimal virtio driver living in plain guest memory, for tests and benchmarks.
//!
//! It lays out split virtqueues, negotiates features through the MMIO registers and adds
//! descriptor chains the way a guest would, so device models are exercised without KVM.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};

use super::mmio::*;
use super::VirtioDevice;
use crate::boot::GuestMem;

/// One queue's layout in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl QueueLayout {
    /// Layout for `size` entries at `base` (page aligned, 16 KiB per queue is plenty for 256).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        QueueLayout {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }
}

/// A guest-side driver over a transport.
pub struct TestDriver {
    /// Guest memory shared with the device.
    pub mem: GuestMem,
    /// Queue layouts.
    pub queues: Vec<QueueLayout>,
}

/// Descriptor flag NEXT.
pub const F_NEXT: u16 = 1;
/// Descriptor flag WRITE (device-writable).
pub const F_WRITE: u16 = 2;

impl TestDriver {
    /// New driver with `nq` queues of `size` at 0x10000 + i * 0x4000.
    pub fn new(mem: GuestMem, nq: usize, size: u16) -> Self {
        let queues = (0..nq)
            .map(|i| QueueLayout::new(0x10000 + i as u64 * 0x4000, size))
            .collect();
        TestDriver { mem, queues }
    }

    /// Reads a 32-bit register.
    pub fn read_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, off: u64, v: u32) {
        t.mmio_write(off, &v.to_le_bytes());
    }

    /// Full initialisation: status handshake, VERSION_1, queue setup, DRIVER_OK.
    pub fn init<D: VirtioDevice>(&self, t: &mut MmioTransport<D>) {
        Self::write_reg(t, REG_STATUS, 0);
        Self::write_reg(t, REG_STATUS, status::ACKNOWLEDGE);
        Self::write_reg(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        Self::write_reg(t, REG_DRIVER_FEATURES_SEL, 1);
        Self::write_reg(t, REG_DRIVER_FEATURES, 1); // VERSION_1
        Self::write_reg(t, REG_DRIVER_FEATURES_SEL, 0);
        Self::write_reg(t, REG_DRIVER_FEATURES, 0);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        Self::write_reg(t, REG_STATUS, s);
        assert_ne!(Self::read_reg(t, REG_STATUS) & status::FEATURES_OK, 0);
        self.setup_queues(t);
        Self::write_reg(t, REG_STATUS, s | status::DRIVER_OK);
    }

    /// Programs every queue's size and addresses and marks it ready.
    pub fn setup_queues<D: VirtioDevice>(&self, t: &mut MmioTransport<D>) {
        for (i, q) in self.queues.iter().enumerate() {
            Self::write_reg(t, REG_QUEUE_SEL, i as u32);
            Self::write_reg(t, REG_QUEUE_NUM, u32::from(q.size));
            Self::write_reg(t, REG_QUEUE_DESC_LOW, q.desc as u32);
            Self::write_reg(t, REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
            Self::write_reg(t, REG_QUEUE_AVAIL_LOW, q.avail as u32);
            Self::write_reg(t, REG_QUEUE_AVAIL_HIGH, (q.avail >> 32) as u32);
            Self::write_reg(t, REG_QUEUE_USED_LOW, q.used as u32);
            Self::write_reg(t, REG_QUEUE_USED_HIGH, (q.used >> 32) as u32);
            Self::write_reg(t, REG_QUEUE_READY, 1);
        }
    }

    /// Writes raw descriptors (addr, len, flags, next) starting at the queue's next free slot
    /// and publishes the first as a chain head. `next` values are relative to the first slot
    /// unless `raw_next` is set. Returns the head index.
    pub fn add_raw(&mut self, qi: usize, descs: &[(u64, u32, u16, u16)], raw_next: bool) -> u16 {
        let q = &mut self.queues[qi];
        let head = q.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % q.size;
            let next = if raw_next {
                next
            } else {
                (head + next) % q.size
            };
            let d = q.desc + 16 * u64::from(idx);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        q.next_desc = (head + descs.len() as u16) % q.size;
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(q.avail_idx, GuestAddress(q.avail + 2))
            .unwrap();
        head
    }

    /// Adds a chain of (addr, len, device_writable) buffers.
    pub fn add_chain(&mut self, qi: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = bufs.len();
        let descs: Vec<(u64, u32, u16, u16)> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, w))| {
                let mut f = if w { F_WRITE } else { 0 };
                if i + 1 < n {
                    f |= F_NEXT;
                }
                (a, l, f, (i + 1) as u16)
            })
            .collect();
        self.add_raw(qi, &descs, false)
    }

    /// Sets the avail index directly (to simulate a corrupt ring).
    pub fn set_avail_idx(&mut self, qi: usize, idx: u16) {
        let q = &mut self.queues[qi];
        q.avail_idx = idx;
        self.mem.write_obj(idx, GuestAddress(q.avail + 2)).unwrap();
    }

    /// New used entries (id, len) since the last call.
    pub fn take_used(&mut self, qi: usize) -> Vec<(u32, u32)> {
        let q = &mut self.queues[qi];
        let idx: u16 = self.mem.read_obj(GuestAddress(q.used + 2)).unwrap();
        let mut out = Vec::new();
        while q.used_seen != idx {
            let e = q.used + 4 + 8 * u64::from(q.used_seen % q.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        out
    }
}
