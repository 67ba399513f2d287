//! Port webhook signatures: `x-port-signature: v1,<base64 HMAC-SHA256>` over
//! `"{x-port-timestamp}.{raw body}"`, keyed with the Port client secret.
//!
//! The comparison is constant-time (`hmac`'s `verify_slice`). The timestamp may be in seconds or
//! milliseconds; it must lie within the tolerance window of when the event reached the channel
//! (the caller passes that time: see `pipeline::received_ms`), so a captured request posted again
//! later is refused, while a valid event that waited in a backlog or is replayed still verifies.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secret::{ExposeSecret as _, SecretString};

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no x-port-signature header")]
    MissingSignature,
    #[error("no x-port-timestamp header")]
    MissingTimestamp,
    #[error("x-port-timestamp is not a number")]
    BadTimestamp,
    #[error("x-port-timestamp is {} away from when the channel received the event, beyond the {} tolerance", humantime::format_duration(*.skew), humantime::format_duration(*.tolerance))]
    OutsideWindow { skew: Duration, tolerance: Duration },
    #[error("x-port-signature has no v1 signature")]
    UnsupportedScheme,
    #[error("x-port-signature's v1 signature is not base64 (damaged on the way, or not Port's)")]
    NotBase64,
    #[error("x-port-signature does not match (wrong client secret, or the body was changed)")]
    Mismatch,
}

/// Checks signatures with one client secret.
#[derive(Clone, Debug)]
pub struct Verifier {
    /// The Port client secret, the HMAC key. Never printed: `Debug` hides it.
    secret: SecretString,
    /// How far the timestamp may be from when the event reached the channel, either way.
    tolerance: Duration,
}

impl Verifier {
    pub fn new(secret: SecretString, tolerance: Duration) -> Self {
        Self { secret, tolerance }
    }

    /// Check `signature` and `timestamp` (the header values) for `body`, which reached the
    /// channel at `received_ms`.
    pub fn verify(
        &self,
        signature: Option<&str>,
        timestamp: Option<&str>,
        body: &[u8],
        received_ms: u64,
    ) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::MissingSignature)?;
        let timestamp = timestamp.ok_or(SignatureError::MissingTimestamp)?.trim();
        let number: u64 = timestamp
            .parse()
            .map_err(|_| SignatureError::BadTimestamp)?;
        // Seconds until the year 33658; anything larger is milliseconds.
        let sent_ms = if number >= 1_000_000_000_000 {
            number
        } else {
            number.saturating_mul(1000)
        };
        let skew = Duration::from_millis(sent_ms.abs_diff(received_ms));
        if skew > self.tolerance {
            return Err(SignatureError::OutsideWindow {
                skew: Duration::from_secs(skew.as_secs()),
                tolerance: self.tolerance,
            });
        }
        let v1: Vec<&str> = signature
            .split_whitespace()
            .filter_map(|part| part.strip_prefix("v1,"))
            .collect();
        if v1.is_empty() {
            return Err(SignatureError::UnsupportedScheme);
        }
        let candidates: Vec<Vec<u8>> = (v1.iter())
            .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .collect();
        if candidates.is_empty() {
            return Err(SignatureError::NotBase64);
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose_secret().as_bytes())
            .expect("HMAC takes any key");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        if candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
        {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = include_str!("../../tests/fixtures/port/signatures.json");

    fn fixture(file: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/port/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// Regression (helper-124): a v1 signature with one character changed (no longer canonical
    /// base64) was refused as "has no v1 signature", though the header plainly had one.
    #[test]
    fn regression_a_damaged_v1_signature_was_said_to_be_missing() {
        let verifier = Verifier::new("s".into(), Duration::from_secs(300));
        for damaged in [
            "v1,WLlZ2iShM/0+UYasX+iZzr2WWi58HTSYil04CqebZgX=",
            "v1,not base64!",
        ] {
            assert_eq!(
                verifier.verify(Some(damaged), Some("1700000000"), b"{}", 1_700_000_000_000),
                Err(SignatureError::NotBase64),
                "{damaged}"
            );
        }
        assert_eq!(
            verifier.verify(
                Some("v2,AAAA"),
                Some("1700000000"),
                b"{}",
                1_700_000_000_000
            ),
            Err(SignatureError::UnsupportedScheme)
        );
    }

    #[test]
    fn every_fixture_vector_verifies_and_tampering_is_caught() {
        let vectors: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let secret = vectors["secret"].as_str().unwrap();
        let verifier = Verifier::new(secret.into(), Duration::from_secs(300));
        let files = vectors["files"].as_array().unwrap();
        assert_eq!(files.len(), 18);
        for v in files {
            let body = fixture(v["file"].as_str().unwrap());
            let ts = v["x-port-timestamp"].as_str().unwrap();
            let sig = v["x-port-signature"].as_str().unwrap();
            let at = ts.parse::<u64>().unwrap() * 1000 + 1000;
            assert_eq!(
                verifier.verify(Some(sig), Some(ts), &body, at),
                Ok(()),
                "{v}"
            );
            let mut tampered = body.clone();
            tampered[10] ^= 1;
            assert_eq!(
                verifier.verify(Some(sig), Some(ts), &tampered, at),
                Err(SignatureError::Mismatch)
            );
            let wrong = Verifier::new("other-secret".into(), Duration::from_secs(300));
            assert_eq!(
                wrong.verify(Some(sig), Some(ts), &body, at),
                Err(SignatureError::Mismatch)
            );
        }
    }

    #[test]
    fn the_window_is_enforced_in_seconds_and_milliseconds() {
        let verifier = Verifier::new("s".into(), Duration::from_secs(300));
        let now_ms = 1_800_000_000_000;
        let sign = |ts: &str| {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"s").unwrap();
            mac.update(format!("{ts}.body").as_bytes());
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            )
        };
        for ts in ["1800000000", "1800000000000", "1799999800"] {
            assert_eq!(
                verifier.verify(Some(&sign(ts)), Some(ts), b"body", now_ms),
                Ok(()),
                "{ts}"
            );
        }
        let old = "1799999000";
        assert!(matches!(
            verifier.verify(Some(&sign(old)), Some(old), b"body", now_ms),
            Err(SignatureError::OutsideWindow { .. })
        ));
        assert_eq!(
            verifier.verify(None, Some(old), b"body", now_ms),
            Err(SignatureError::MissingSignature)
        );
        assert_eq!(
            verifier.verify(Some("v1,x"), None, b"", now_ms),
            Err(SignatureError::MissingTimestamp)
        );
        assert_eq!(
            verifier.verify(Some("v0,abc"), Some("1800000000"), b"", now_ms),
            Err(SignatureError::UnsupportedScheme)
        );
        let shown = format!(
            "{:?}",
            Verifier::new("hunter2-secret".into(), Duration::ZERO)
        );
        assert!(
            !shown.contains("hunter2") && shown.contains("REDACTED"),
            "{shown}"
        );
    }
}
