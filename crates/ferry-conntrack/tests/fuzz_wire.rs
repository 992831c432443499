//! Fuzzing the ctnetlink parser with proptest: arbitrary datagrams and
//! mutated real messages are read without panicking or looping; a malformed
//! message is an error. Bounded by `PROPTEST_CASES` (`make fuzz`).

use ferry_conntrack::wire::{Reply, create_request, messages, parse_entry};
use ferry_conntrack::{Entry, IPPROTO_UDP};
use proptest::prelude::*;

fn seed(v6: bool) -> Vec<u8> {
    let entry = if v6 {
        Entry::new(
            IPPROTO_UDP,
            "[fd00::1]:40000".parse().unwrap(),
            "[fd00::10]:53".parse().unwrap(),
            "[fd00::20]:53".parse().unwrap(),
        )
    } else {
        Entry::new(
            IPPROTO_UDP,
            "10.0.0.1:40000".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
            "10.244.1.7:53".parse().unwrap(),
        )
    };
    let mut buf = Vec::new();
    create_request(&mut buf, &entry, 30, 7, true);
    buf
}

/// Reads every message of a datagram and parses every entry payload; the
/// reader must stop after at most one message per 4 bytes.
fn read_all(buf: &[u8]) {
    let mut n = 0usize;
    for m in messages(buf) {
        n += 1;
        assert!(n <= buf.len() / 4 + 1, "the reader does not advance");
        match m {
            Ok(msg) => {
                if let Reply::Entry(payload) = msg.reply {
                    let _ = parse_entry(payload);
                }
            }
            Err(_) => break,
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_datagrams_never_panic(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        read_all(&buf);
        let _ = parse_entry(&buf);
    }

    #[test]
    fn mutated_messages_never_panic(v6 in any::<bool>(), edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut buf = seed(v6);
        for (at, byte) in edits {
            let at = at % buf.len();
            buf[at] = byte;
        }
        // Present it as a kernel message (NEW) as well as it was written.
        read_all(&buf);
        let cut = cut % (buf.len() + 1);
        read_all(&buf[..cut]);
        if buf.len() > 16 {
            let _ = parse_entry(&buf[16..]);
            let _ = parse_entry(&buf[16..16 + (cut % (buf.len() - 15))]);
        }
    }
}
