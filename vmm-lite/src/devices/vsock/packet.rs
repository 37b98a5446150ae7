//! vsock packets: the 44-byte header and bounded parsing from descriptor chains.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

/// Header size on the wire.
pub const HDR_SIZE: usize = 44;
/// Largest payload we accept or produce in one packet.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Most descriptors we follow in one chain.
pub const MAX_CHAIN_DESCS: usize = 64;

/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;
/// Operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset.
    pub const RST: u16 = 3;
    /// Shutdown (flags say which direction).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit update.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit request.
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flag: peer will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: peer will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// The virtio-vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Parses 44 little-endian bytes.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Serialises to 44 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet with an owned payload buffer (reused across packets).
#[derive(Debug, Default, Clone)]
pub struct VsockPacket {
    /// Header.
    pub hdr: VsockHeader,
    /// Payload; `hdr.len == data.len()` for packets built by the device.
    pub data: Vec<u8>,
}

/// Why a descriptor chain was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain is shorter than a header.
    #[error("descriptor chain shorter than the 44-byte header")]
    ShortHeader,
    /// A TX chain contained a device-writable descriptor, or an RX chain a readable one.
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    /// hdr.len exceeds the limit.
    #[error("payload length {0} exceeds the 64 KiB limit")]
    TooLong(u32),
    /// hdr.len exceeds the bytes the chain actually holds.
    #[error("payload length {0} exceeds the chain's {1} bytes")]
    Truncated(u32, usize),
    /// Too many descriptors.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCS}")]
    ChainTooLong,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// Chain too small to hold a header.
    #[error("RX buffer smaller than the header")]
    RxTooSmall,
}

/// Reads a TX (driver → device) chain into `pkt`, enforcing every bound.
pub fn read_tx_chain<M>(
    chain: DescriptorChain<M>,
    mem: &M::Target,
    pkt: &mut VsockPacket,
) -> Result<(), PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut hdr = [0u8; HDR_SIZE];
    let mut hdr_got = 0usize;
    let mut want_data: Option<usize> = None;
    pkt.data.clear();
    for (n, desc) in chain.enumerate() {
        if n >= MAX_CHAIN_DESCS {
            return Err(PacketError::ChainTooLong);
        }
        if desc.is_write_only() {
            return Err(PacketError::WrongDirection);
        }
        let mut addr = desc.addr();
        let mut len = desc.len() as usize;
        if hdr_got < HDR_SIZE {
            let take = len.min(HDR_SIZE - hdr_got);
            mem.read_slice(&mut hdr[hdr_got..hdr_got + take], addr)
                .map_err(|_| PacketError::BadAddress)?;
            hdr_got += take;
            len -= take;
            addr = addr
                .checked_add(take as u64)
                .ok_or(PacketError::BadAddress)?;
            if hdr_got == HDR_SIZE {
                let h = VsockHeader::from_bytes(&hdr);
                if h.len as usize > MAX_PKT_DATA {
                    return Err(PacketError::TooLong(h.len));
                }
                pkt.hdr = h;
                want_data = Some(h.len as usize);
            }
        }
        if let Some(want) = want_data {
            let take = len.min(want - pkt.data.len());
            if take > 0 {
                let start = pkt.data.len();
                pkt.data.resize(start + take, 0);
                mem.read_slice(&mut pkt.data[start..], addr)
                    .map_err(|_| PacketError::BadAddress)?;
            }
        }
    }
    match want_data {
        None => Err(PacketError::ShortHeader),
        Some(w) if pkt.data.len() < w => Err(PacketError::Truncated(w as u32, pkt.data.len())),
        Some(_) => Ok(()),
    }
}

/// The writable extents of an RX (device → driver) chain.
#[derive(Debug, Default)]
pub struct RxBuffers {
    /// (guest address, length) of each writable descriptor.
    pub descs: Vec<(vm_memory::GuestAddress, usize)>,
    /// Total writable bytes.
    pub capacity: usize,
}

impl RxBuffers {
    /// Collects the writable descriptors of `chain`.
    pub fn from_chain<M>(chain: DescriptorChain<M>, mem: &M::Target) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut out = RxBuffers::default();
        for (n, desc) in chain.enumerate() {
            if n >= MAX_CHAIN_DESCS {
                return Err(PacketError::ChainTooLong);
            }
            if !desc.is_write_only() {
                return Err(PacketError::WrongDirection);
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let end = desc
                .addr()
                .checked_add(len as u64 - 1)
                .ok_or(PacketError::BadAddress)?;
            let _ = end;
            if !mem.check_range(desc.addr(), len, vm_memory::Permissions::Write) {
                return Err(PacketError::BadAddress);
            }
            out.descs.push((desc.addr(), len));
            out.capacity = out.capacity.saturating_add(len);
        }
        if out.capacity < HDR_SIZE {
            return Err(PacketError::RxTooSmall);
        }
        Ok(out)
    }

    /// Writes header then payload across the descriptors. Returns bytes written.
    pub fn write_packet<M: GuestMemory>(
        &self,
        mem: &M,
        hdr: &[u8; HDR_SIZE],
        data: &[u8],
    ) -> Result<usize, PacketError> {
        let mut src: [&[u8]; 2] = [hdr, data];
        let mut written = 0;
        for &(addr, len) in &self.descs {
            let mut off = 0usize;
            while off < len {
                let cur = if !src[0].is_empty() {
                    0
                } else if !src[1].is_empty() {
                    1
                } else {
                    return Ok(written);
                };
                let take = (len - off).min(src[cur].len());
                mem.write_slice(&src[cur][..take], addr.unchecked_add(off as u64))
                    .map_err(|_| PacketError::BadAddress)?;
                src[cur] = &src[cur][take..];
                off += take;
                written += take;
            }
        }
        Ok(written)
    }
}

use vm_memory::Address;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&b), h);
    }
}
