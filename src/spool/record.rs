//! How a [`DeliveryRecord`] is stored as a `records` row. Every event is written with one record
//! per route and rewritten when its delivery is marked, and a route reading its queue back reads
//! each record: the row's encoding is on the per-event path, so it is a fixed binary layout, not
//! JSON (which cost about a fifth of the writer's instructions per event in workload (a),
//! BENCHMARKS.md, "Issue 19, seventeenth session").
//!
//! Rows written before format version 3 are JSON (`{"status":…}`); they are still read, and a
//! row is rewritten in this layout the next time its delivery changes. A binary row starts with
//! [`TAG`], a byte no JSON document starts with:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | [`TAG`] |
//! | 1 | status: 0 pending, 1 delivered, 2 dead |
//! | 1 | flags: bit 0 `last_status` is set, bit 1 `last_error` is set |
//! | 4 | attempts, u32 LE |
//! | 2 | last status, u16 LE (0 when unset) |
//! | 8 | updated_ms, u64 LE |
//! | 8 | seq, u64 LE |
//! | rest | last error, UTF-8 (empty when unset) |

use super::bin::flags;
use super::{DeliveryRecord, Status};

/// The first byte of a binary row.
const TAG: u8 = 1;

/// The fixed part of a binary row, before the error.
const FIXED: usize = 1 + 1 + 1 + 4 + 2 + 8 + 8;

const HAS_STATUS: u8 = 1;
const HAS_ERROR: u8 = 2;

/// `record` as a row.
pub(super) fn encode(record: &DeliveryRecord) -> Vec<u8> {
    let error = record.last_error.as_deref().unwrap_or("");
    let mut row = Vec::with_capacity(FIXED + error.len());
    let status = match record.status {
        Status::Pending => 0,
        Status::Delivered => 1,
        Status::Dead => 2,
    };
    let flags = flags(&[
        (record.last_status.is_some(), HAS_STATUS),
        (record.last_error.is_some(), HAS_ERROR),
    ]);
    row.extend_from_slice(&[TAG, status, flags]);
    row.extend_from_slice(&record.attempts.to_le_bytes());
    row.extend_from_slice(&record.last_status.unwrap_or(0).to_le_bytes());
    row.extend_from_slice(&record.updated_ms.to_le_bytes());
    row.extend_from_slice(&record.seq.to_le_bytes());
    row.extend_from_slice(error.as_bytes());
    row
}

/// A row as a record, in either layout; `None` if it is neither (damaged).
pub(super) fn decode(row: &[u8]) -> Option<DeliveryRecord> {
    if row.first() != Some(&TAG) {
        return serde_json::from_slice(row).ok();
    }
    let fixed = row.get(..FIXED)?;
    let status = status_of(fixed[1])?;
    let flags = fixed[2];
    let attempts = u32::from_le_bytes(fixed[3..7].try_into().ok()?);
    let last_status = u16::from_le_bytes(fixed[7..9].try_into().ok()?);
    let updated_ms = u64::from_le_bytes(fixed[9..17].try_into().ok()?);
    let seq = u64::from_le_bytes(fixed[17..25].try_into().ok()?);
    let error = std::str::from_utf8(&row[FIXED..]).ok()?;
    Some(DeliveryRecord {
        status,
        attempts,
        last_status: (flags & HAS_STATUS != 0).then_some(last_status),
        last_error: (flags & HAS_ERROR != 0).then(|| error.to_string()),
        updated_ms,
        seq,
    })
}

/// The status byte of a binary row.
fn status_of(byte: u8) -> Option<Status> {
    match byte {
        0 => Some(Status::Pending),
        1 => Some(Status::Delivered),
        2 => Some(Status::Dead),
        _ => None,
    }
}

/// Only the status of a row (a scan that looks at nothing else: pruning, purging), without
/// copying its error; `None` exactly where [`decode`] is.
pub(super) fn status(row: &[u8]) -> Option<Status> {
    if row.first() == Some(&TAG) && row.len() >= FIXED {
        std::str::from_utf8(&row[FIXED..]).ok()?;
        return status_of(row[1]);
    }
    decode(row).map(|r| r.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_record() -> impl Strategy<Value = DeliveryRecord> {
        (
            prop_oneof![
                Just(Status::Pending),
                Just(Status::Delivered),
                Just(Status::Dead)
            ],
            any::<u32>(),
            any::<Option<u16>>(),
            any::<Option<String>>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(status, attempts, last_status, last_error, updated_ms, seq)| DeliveryRecord {
                    status,
                    attempts,
                    last_status,
                    last_error,
                    updated_ms,
                    seq,
                },
            )
    }

    proptest! {
        #[test]
        fn a_record_reads_back_as_written(record in any_record()) {
            let row = encode(&record);
            prop_assert_eq!(decode(&row), Some(record.clone()));
            prop_assert_eq!(status(&row), Some(record.status));
        }

        #[test]
        fn a_row_written_as_json_before_format_3_still_reads(record in any_record()) {
            let row = serde_json::to_vec(&record).unwrap();
            prop_assert_eq!(decode(&row), Some(record.clone()));
            prop_assert_eq!(status(&row), Some(record.status));
        }

        /// Any bytes: no panic, and pruning (`status`) reads a row as listing (`decode`) does.
        #[test]
        fn a_damaged_row_is_none_or_a_record_never_a_panic(
            mut row in proptest::collection::vec(any::<u8>(), 0..64),
            binary in any::<bool>(),
        ) {
            if binary && !row.is_empty() {
                row[0] = TAG;
            }
            prop_assert_eq!(status(&row), decode(&row).map(|r| r.status));
        }

        #[test]
        fn a_cut_binary_row_is_refused(record in any_record(), cut in 0usize..FIXED) {
            let row = encode(&record);
            prop_assert_eq!(decode(&row[..cut]), None);
        }
    }

    #[test]
    fn an_unknown_status_byte_is_refused() {
        let mut row = encode(&DeliveryRecord {
            status: Status::Pending,
            attempts: 0,
            last_status: None,
            last_error: None,
            updated_ms: 1,
            seq: 1,
        });
        row[1] = 9;
        assert_eq!(decode(&row), None);
        assert_eq!(status(&row), None);
    }
}
