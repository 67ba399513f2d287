//! How an event travels in the cluster's stream, and how a body too large for one NATS
//! message travels beside it.
//!
//! A message carries the event's body as its raw payload and everything else (the channel,
//! the receive time, the event's headers and query, a replay's origin) as JSON in one NATS
//! header, `Smee-Relay-Meta`, so a frame costs its body plus a few hundred bytes. A message
//! (headers and body) larger than the server's `max_payload` (1 MiB by default) carries no
//! payload: its body is in the cluster's JetStream Object Store bucket (`smee_<name>_bodies`,
//! kept as long as the stream keeps frames) under a name derived from the message id, so an
//! outbox that publishes it twice (an ack lost, a restart) stores it once, and the message
//! says where (`Smee-Relay-Object`). The consumer reads it back before queueing the event.
//!
//! Messages published before this format (a JSON [`Envelope`] as the whole payload, the body
//! as an array of numbers) are still read: a stream keeps them through an upgrade.
//!
//! It must not decide what is retried: it only says whether a failure can ever succeed
//! ([`PublishError::is_permanent`]); the outbox route decides.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::AsyncReadExt as _;

use super::{Cluster, NatsError};
use crate::event::Event;

/// The header that marks this format (its value is the format's version).
const FORMAT: &str = "Smee-Relay-Envelope";
/// The header holding [`Meta`] as JSON.
const META: &str = "Smee-Relay-Meta";
/// The header naming the object that holds the body, when the payload does not.
const OBJECT: &str = "Smee-Relay-Object";
/// The body's length, when it is in the object store (checked when it is read back).
const BODY_LEN: &str = "Smee-Relay-Body-Len";

/// What a message's headers and the protocol line around it may add to its size beyond what
/// [`wire_len`] counts (the `Nats-Msg-Id` header, the HPUB line): room kept below
/// `max_payload` so a body that nearly fills it goes to the object store, not to a refusal.
const SLACK: usize = 512;

/// JetStream's answers that a body does not fit the storage it may use (insufficient
/// resources, account resources exceeded, storage resources exceeded, message over the
/// stream's maximum): retrying the same body does not make room.
const NO_ROOM: [&str; 4] = [
    "error code 10023",
    "error code 10002",
    "error code 10047",
    "error code 10054",
];

/// Uploads this process started: part of each upload's nuid.
static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The largest chunk an object is stored in (the client's default).
const MAX_CHUNK: usize = 128 * 1024;

/// A frame (or a produced event) as the stream carries it.
#[derive(Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// The channel as displayed (secret parts redacted): the local spool's `channel` field.
    pub(crate) channel: String,
    /// When the publishing instance received it (ms since the epoch).
    pub(crate) received_ms: u64,
    /// The event itself.
    pub(crate) event: Event,
    /// For a replay (`events replay` in cluster mode): the stream sequence it replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) replay_of: Option<u64>,
}

/// Everything of an [`Envelope`] but the body: the `Smee-Relay-Meta` header.
#[derive(Serialize, Deserialize)]
struct Meta {
    /// [`Envelope::channel`].
    channel: String,
    /// [`Envelope::received_ms`].
    received_ms: u64,
    /// [`Event::sse_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sse_id: Option<String>,
    /// [`Event::timestamp_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp_ms: Option<u64>,
    /// [`Event::headers`].
    #[serde(default)]
    headers: Vec<(String, String)>,
    /// [`Event::query`].
    #[serde(default)]
    query: Vec<(String, String)>,
    /// [`Envelope::replay_of`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replay_of: Option<u64>,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// NATS is unreachable, slow, or refused for now: the same publish may succeed later.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// No publish of this event can ever succeed (what and why are in the text).
    #[error("{0}")]
    Refused(String),
}

impl PublishError {
    /// Whether retrying the same publish can never succeed (the outbox gives it up).
    pub fn is_permanent(&self) -> bool {
        matches!(self, PublishError::Refused(_))
    }
}

/// Why a message could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// Not what a relay publishes, or its body is gone: no instance can ever deliver it.
    #[error("{0}")]
    Invalid(String),
    /// Its body could not be fetched from the object store now: try again later.
    #[error("cannot fetch its body from the NATS object store")]
    Fetch(#[source] async_nats::Error),
}

/// The object store bucket that holds the bodies too large for one message.
pub(crate) fn bucket_name(cluster: &str) -> String {
    format!("smee_{cluster}_bodies")
}

/// Open (or create) the bodies' bucket: its objects are kept as long as the stream keeps its
/// frames, so a frame never outlives its body by more than the publish's delay.
pub(crate) async fn bodies_bucket(
    js: &jetstream::Context,
    cluster: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<object_store::ObjectStore, async_nats::Error> {
    let bucket = bucket_name(cluster);
    match js.get_object_store(&bucket).await {
        Ok(store) => Ok(store),
        Err(_) => Ok(js
            .create_object_store(object_store::Config {
                bucket,
                description: Some("smee-relay: webhook bodies too large for one message".into()),
                max_age,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await?),
    }
}

/// The object a message id's body is stored under: the same id (one frame, however many
/// instances or retries publish it) names the same object.
fn object_name(message_id: &str) -> String {
    let digest = sha2::Sha256::digest(message_id.as_bytes());
    format!("body-{}", hex::encode(digest))
}

/// The size of a header block on the wire (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`).
fn wire_len(headers: &[(&str, &str)]) -> usize {
    10 + headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum::<usize>()
        + 2
}

impl Cluster {
    /// Publish `envelope` on `subject` under message id `id` (stored once within the dedupe
    /// window): its body as the payload, or in the object store if the message would exceed
    /// the server's `max_payload`. Returns the publish ack.
    pub(crate) async fn publish_envelope(
        &self,
        subject: String,
        id: String,
        envelope: &Envelope,
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        let event = &envelope.event;
        let meta = serde_json::to_string(&Meta {
            channel: envelope.channel.clone(),
            received_ms: envelope.received_ms,
            sse_id: event.sse_id.clone(),
            timestamp_ms: event.timestamp_ms,
            headers: event.headers.clone(),
            query: event.query.clone(),
            replay_of: envelope.replay_of,
        })
        .map_err(|e| {
            PublishError::Refused(format!(
                "cannot encode the event for the cluster ({e}); it is not published"
            ))
        })?;
        // Compact JSON escapes control characters, so the header never holds a line break.
        let meta_value: async_nats::HeaderValue = meta.parse().map_err(|e| {
            PublishError::Refused(format!(
                "the event's headers cannot travel in a NATS header ({e}); it is not published"
            ))
        })?;
        let max_payload = self.client.server_info().max_payload;
        let fixed = wire_len(&[
            (FORMAT, "2"),
            (META, &meta),
            ("Nats-Msg-Id", &id),
            (OBJECT, &object_name(&id)),
            (BODY_LEN, &event.body.len().to_string()),
        ]) + SLACK;
        if fixed > max_payload {
            return Err(PublishError::Refused(format!(
                "the event's headers and query ({} bytes as JSON) exceed the NATS server's max_payload ({max_payload} bytes) even with the body stored apart; it is not published: raise max_payload in nats-server.conf, or have the sender send fewer headers",
                meta.len()
            )));
        }
        let mut headers = HeaderMap::new();
        headers.insert(FORMAT, "2");
        headers.insert(META, meta_value);
        let inline = fixed + event.body.len() <= max_payload;
        let payload = if inline {
            event.body.clone()
        } else {
            let name = self.store_body(&id, &event.body, max_payload).await?;
            headers.insert(OBJECT, name.as_str());
            headers.insert(BODY_LEN, event.body.len().to_string().as_str());
            Bytes::new()
        };
        let publish = jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(payload)
            .message_id(id);
        // A refusal for size here means the server's max_payload shrank since it was asked (a
        // failover to another server): the next attempt asks again.
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| PublishError::Nats(NatsError(e.into())))?;
        match ack.await {
            Ok(ack) => {
                self.saw_seq(ack.sequence);
                Ok(ack)
            }
            Err(e) => {
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                    self.stream_gone().await;
                }
                Err(PublishError::Nats(NatsError(e.into())))
            }
        }
    }

    /// Store `body` (too large for one message) in the bodies' bucket under `id`'s object,
    /// once: an object already there with the same length is the same body (the name is a
    /// hash of the message id, itself a hash of the event). Returns the object's name.
    ///
    /// Written as the client's `put` writes it (chunks on `$O.<bucket>.C.<nuid>`, then the
    /// object's info on `$O.<bucket>.M.<name>`, so `get` reads it), but with a nuid of its own:
    /// a failed upload purges the chunks it wrote, where `put` would leave them taking the
    /// JetStream storage whose lack made it fail, until the bucket's max age.
    async fn store_body(
        &self,
        id: &str,
        body: &Bytes,
        max_payload: usize,
    ) -> Result<String, PublishError> {
        use base64::Engine as _;
        let name = object_name(id);
        let earlier = self.bodies.info(&name).await.ok();
        if let Some(info) = &earlier
            && !info.deleted
            && info.size == body.len()
        {
            return Ok(name);
        }
        let bucket = bucket_name(&self.settings.name);
        let nuid = {
            let mut hash = sha2::Sha256::new();
            hash.update(name.as_bytes());
            hash.update(crate::clock::now_ms().to_be_bytes());
            hash.update(std::process::id().to_be_bytes());
            hash.update(
                UPLOADS
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .to_be_bytes(),
            );
            hex::encode(&hash.finalize()[..12])
        };
        let chunks_subject = format!("$O.{bucket}.C.{nuid}");
        // Each chunk is one message: it must fit the server's max_payload.
        let chunk_size = MAX_CHUNK.min(max_payload.saturating_sub(SLACK).max(1024));
        let uploaded = async {
            let mut chunks = 0;
            let mut at = 0;
            while at < body.len() {
                let end = (at + chunk_size).min(body.len());
                self.js
                    .publish(chunks_subject.clone(), body.slice(at..end))
                    .await?
                    .await?;
                chunks += 1;
                at = end;
            }
            let info = object_store::ObjectInfo {
                name: name.clone(),
                description: None,
                metadata: Default::default(),
                headers: None,
                options: Some(object_store::ObjectOptions {
                    link: None,
                    max_chunk_size: Some(chunk_size),
                }),
                bucket: bucket.clone(),
                nuid: nuid.clone(),
                size: body.len(),
                chunks,
                modified: None,
                digest: Some(format!(
                    "SHA-256={}",
                    base64::engine::general_purpose::URL_SAFE.encode(sha2::Sha256::digest(body))
                )),
                deleted: false,
            };
            let mut headers = HeaderMap::new();
            // The object's latest info replaces the ones before it.
            headers.insert("Nats-Rollup", "sub");
            let info = serde_json::to_vec(&info)?;
            let meta_subject = format!(
                "$O.{bucket}.M.{}",
                base64::engine::general_purpose::URL_SAFE.encode(&name)
            );
            self.js
                .publish_with_headers(meta_subject, headers, info.into())
                .await?
                .await?;
            Ok::<(), async_nats::Error>(())
        }
        .await;
        let objects = format!("OBJ_{bucket}");
        if let Err(e) = uploaded {
            if let Ok(stream) = self.js.get_stream(&objects).await {
                let _ = stream.purge().filter(&chunks_subject).await;
            }
            let error = crate::error::chain(&*e);
            if NO_ROOM.iter().any(|code| error.contains(code)) {
                // JetStream has no room for it: retrying would hold every frame behind it
                // (those that fit still go).
                return Err(PublishError::Refused(format!(
                    "NATS has no room for its body ({} bytes) in the object store bucket {bucket}: {error}; it is not published (this instance's spool keeps it as a dead letter: `smee-relay events list --local`): free JetStream storage or raise its limits (max_file_store, the account's), or lower --max-frame",
                    body.len(),
                )));
            }
            return Err(PublishError::Nats(NatsError(e)));
        }
        // A different body stored under the name before (it cannot be the same event's):
        // its chunks are no longer read.
        if let Some(info) = earlier
            && info.nuid != nuid
            && let Ok(stream) = self.js.get_stream(&objects).await
        {
            let _ = stream
                .purge()
                .filter(format!("$O.{bucket}.C.{}", info.nuid))
                .await;
        }
        Ok(name)
    }

    /// Read a message back: this format (the body as the payload, or in the object store),
    /// or the one before it (a JSON envelope).
    pub(crate) async fn open_envelope(
        &self,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) -> Result<Envelope, OpenError> {
        let Some(headers) = headers.filter(|h| h.get(FORMAT).is_some()) else {
            // Published before this format: the whole payload is the envelope.
            return serde_json::from_slice(payload)
                .map_err(|e| OpenError::Invalid(format!("not a relay frame ({e})")));
        };
        let version = headers.get(FORMAT).map(|v| v.as_str()).unwrap_or_default();
        if version != "2" {
            return Err(OpenError::Invalid(format!(
                "a relay frame of format {version:?}, newer than this relay reads (upgrade it)"
            )));
        }
        let meta: Meta = headers
            .get(META)
            .ok_or_else(|| OpenError::Invalid(format!("a relay frame without its {META} header")))
            .and_then(|meta| {
                serde_json::from_str(meta.as_str()).map_err(|e| {
                    OpenError::Invalid(format!(
                        "a relay frame whose {META} header is not valid ({e})"
                    ))
                })
            })?;
        let body = match headers.get(OBJECT) {
            None => payload.clone(),
            Some(name) => {
                let expected = headers
                    .get(BODY_LEN)
                    .and_then(|len| len.as_str().parse::<usize>().ok());
                self.fetch_body(name.as_str(), expected).await?
            }
        };
        Ok(Envelope {
            channel: meta.channel,
            received_ms: meta.received_ms,
            event: Event {
                sse_id: meta.sse_id,
                timestamp_ms: meta.timestamp_ms,
                headers: meta.headers,
                query: meta.query,
                body,
            },
            replay_of: meta.replay_of,
        })
    }

    /// A body stored apart (checked against its SHA-256 digest by the client as it reads,
    /// and against the length the message says).
    async fn fetch_body(&self, name: &str, expected: Option<usize>) -> Result<Bytes, OpenError> {
        // Test-only (debug builds, `SMEE_RELAY_FAULT=slow-body-fetch=<ms>`): a slow link.
        #[cfg(debug_assertions)]
        if let Some(ms) = super::fault("slow-body-fetch").and_then(|ms| ms.parse().ok()) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let mut object = match self.bodies.get(name).await {
            Ok(object) => object,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                return Err(OpenError::Invalid(format!(
                    "its body (object {name} in bucket {}) is no longer in the NATS object store: it expired with the stream's max_age, or was deleted",
                    bucket_name(&self.settings.name)
                )));
            }
            Err(e) => return Err(OpenError::Fetch(e.into())),
        };
        let mut body = Vec::with_capacity(expected.unwrap_or(0));
        object
            .read_to_end(&mut body)
            .await
            .map_err(|e| OpenError::Fetch(e.into()))?;
        if let Some(expected) = expected
            && body.len() != expected
        {
            return Err(OpenError::Fetch(
                format!(
                    "object {name} holds {} bytes, the message says {expected}",
                    body.len()
                )
                .into(),
            ));
        }
        Ok(Bytes::from(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_size_counts_the_wire_format() {
        // `NATS/1.0\r\n` + `A: b\r\n` + `\r\n`
        assert_eq!(wire_len(&[("A", "b")]), 10 + 6 + 2);
    }

    #[test]
    fn one_message_id_names_one_object() {
        assert_eq!(object_name("abc"), object_name("abc"));
        assert_ne!(object_name("abc"), object_name("abd"));
        // A valid object name whatever the id holds (replays' ids have dots).
        assert!(
            object_name("replay.x.1.2")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        );
    }
}
