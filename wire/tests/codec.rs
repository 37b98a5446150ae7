//! Decoder behaviour against hostile and awkward input, over real streams.

use std::time::Duration;
use tokio::io::AsyncWriteExt;
use wire::*;

fn sample_frames() -> Vec<Frame> {
    vec![
        Hello {
            protocol_version: PROTOCOL_VERSION,
            sandbox_id: "sb-1".into(),
            boot_id: "b".repeat(36),
            hostname: "sb-1".into(),
            cpu: Some(CpuInfo {
                model: "AMD EPYC".into(),
                cores: 2,
                ..Default::default()
            }),
            mem: Some(MemInfo {
                total_kib: 1024,
                free_kib: 512,
                available_kib: 700,
            }),
            markers: vec![Marker {
                name: "init_start".into(),
                since_init_ns: 0,
            }],
            ..Default::default()
        }
        .into(),
        Invoke {
            invoke_id: "r1".into(),
            payload: vec![7; 300_000],
            timeout_ms: 3000,
            ..Default::default()
        }
        .into(),
        Log {
            seq: 1,
            stream: LogStream::Stderr as i32,
            line: "hello".into(),
            ..Default::default()
        }
        .into(),
        InvokeResult {
            invoke_id: "r1".into(),
            status: InvokeStatus::Ok as i32,
            ..Default::default()
        }
        .into(),
        Ping { nonce: 9 }.into(),
    ]
}

fn stream_of(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode_frame_into(f, &mut out).unwrap();
    }
    out
}

#[test]
fn roundtrip_every_split_point_of_a_small_stream() {
    let frames = vec![
        Frame::from(Ping { nonce: 1 }),
        Frame::from(Pong {
            nonce: 1,
            since_init_ns: 5,
        }),
    ];
    let bytes = stream_of(&frames);
    for split in 0..=bytes.len() {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        d.extend(&bytes[..split]);
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
        d.extend(&bytes[split..]);
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames, "split at {split}");
        d.finish().unwrap();
    }
}

#[test]
fn byte_at_a_time_reassembles_large_frames() {
    let frames = sample_frames();
    let bytes = stream_of(&frames);
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &bytes {
        d.extend(std::slice::from_ref(b));
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn oversized_length_is_rejected_before_buffering_body() {
    let mut d = FrameDecoder::new();
    d.extend(&((MAX_FRAME as u32) + 1).to_le_bytes());
    match d.next_frame() {
        Err(DecodeError::Oversized { len, max }) => {
            assert_eq!(len, MAX_FRAME + 1);
            assert_eq!(max, MAX_FRAME);
        }
        other => panic!("expected Oversized, got {other:?}"),
    }
    let mut d = FrameDecoder::new();
    d.extend(&u32::MAX.to_le_bytes());
    assert!(matches!(d.next_frame(), Err(DecodeError::Oversized { .. })));
}

#[test]
fn exactly_max_frame_is_accepted_and_one_more_refused_by_encoder() {
    // A payload that makes the frame land within the limit.
    let f: Frame = Invoke {
        payload: vec![1; MAX_PAYLOAD],
        ..Default::default()
    }
    .into();
    let bytes = encode_frame(&f).unwrap();
    assert!(bytes.len() - LEN_PREFIX <= MAX_FRAME);
    let mut d = FrameDecoder::new();
    d.extend(&bytes);
    assert_eq!(d.next_frame().unwrap().unwrap(), f);

    let big: Frame = Invoke {
        payload: vec![1; MAX_FRAME],
        ..Default::default()
    }
    .into();
    assert!(matches!(
        encode_frame(&big),
        Err(EncodeError::TooLarge { .. })
    ));
}

#[test]
fn garbage_body_is_malformed_not_a_panic() {
    // Deterministic pseudo-random garbage of many lengths.
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut malformed = 0;
    for len in 1..400usize {
        let mut body = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.push(x as u8);
        }
        let mut d = FrameDecoder::new();
        d.extend(&(len as u32).to_le_bytes());
        d.extend(&body);
        match d.next_frame() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("whole frame present but decoder wants more"),
            Err(DecodeError::Malformed { .. }) | Err(DecodeError::Empty) => malformed += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(
        malformed > 300,
        "most random bodies must be rejected, got {malformed}"
    );
}

#[test]
fn empty_body_is_an_error() {
    let mut d = FrameDecoder::new();
    d.extend(&0u32.to_le_bytes());
    assert!(matches!(d.next_frame(), Err(DecodeError::Empty)));
}

#[test]
fn truncated_stream_reports_how_much_was_missing() {
    let bytes = encode_frame(&Ping { nonce: 42 }.into()).unwrap();
    let mut cur = std::io::Cursor::new(bytes[..bytes.len() - 1].to_vec());
    let mut d = FrameDecoder::new();
    match d.read_frame(&mut cur) {
        Err(DecodeError::Truncated { have, need }) => {
            assert_eq!(have, bytes.len() - 1);
            assert_eq!(need, bytes.len());
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    // Two bytes of a prefix only.
    let mut cur = std::io::Cursor::new(vec![1u8, 0]);
    assert!(matches!(
        FrameDecoder::new().read_frame(&mut cur),
        Err(DecodeError::Truncated { .. })
    ));
    // Clean EOF between frames is not an error.
    let mut cur = std::io::Cursor::new(Vec::new());
    assert!(FrameDecoder::new().read_frame(&mut cur).unwrap().is_none());
}

#[test]
fn log_line_truncation_respects_char_boundaries() {
    let mut s = "é".repeat(10); // 20 bytes
    assert!(truncate_line(&mut s, 5));
    assert_eq!(s.len(), 4);
    let mut short = "abc".to_string();
    assert!(!truncate_line(&mut short, 5));
}

#[tokio::test]
async fn async_reader_over_duplex_with_split_writes() {
    let (mut tx, rx) = tokio::io::duplex(64);
    let frames = sample_frames();
    let bytes = stream_of(&frames);
    let writer = tokio::spawn(async move {
        // Uneven chunk sizes, with pauses, so frames straddle reads.
        let mut i = 0;
        let mut step = 1;
        while i < bytes.len() {
            let end = (i + step).min(bytes.len());
            tx.write_all(&bytes[i..end]).await.unwrap();
            i = end;
            step = step * 3 % 1021 + 1;
            if step % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut r = AsyncFrameReader::new(rx);
    let mut got = Vec::new();
    while let Some(f) = r.next().await.unwrap() {
        got.push(f);
    }
    writer.await.unwrap();
    assert_eq!(got, frames);
}

#[tokio::test]
async fn async_writer_reader_roundtrip_and_early_close() {
    // The buffer is smaller than the largest frame: the reader must run concurrently.
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut w = AsyncFrameWriter::new(a);
    let mut r = AsyncFrameReader::new(b);
    for f in sample_frames() {
        let (sent, got) = tokio::join!(w.send(&f), r.next());
        sent.unwrap();
        assert_eq!(got.unwrap().unwrap(), f);
    }
    // A writer that sends half a frame, then closes.
    let mut raw = w.into_inner();
    let bytes = encode_frame(&Ping { nonce: 3 }.into()).unwrap();
    raw.write_all(&bytes[..3]).await.unwrap();
    drop(raw);
    assert!(matches!(r.next().await, Err(DecodeError::Truncated { .. })));
}

#[tokio::test]
async fn async_reader_rejects_oversized_prefix_from_peer() {
    let (mut a, b) = tokio::io::duplex(64);
    a.write_all(&(64u32 << 20).to_le_bytes()).await.unwrap();
    let mut r = AsyncFrameReader::new(b);
    assert!(matches!(r.next().await, Err(DecodeError::Oversized { .. })));
}
