//! The Port (port.io) entity-change payload, in both shapes Port has sent.
//!
//! - the legacy changelog destination: `action`, `resourceType`, `status`, `trigger`,
//!   `context {blueprint, entity, runId}`, `diff {before, after}`;
//! - the Automation webhook that replaced it (July 2026): the same with
//!   `context {blueprintIdentifier, entityIdentifier, propertyIdentifier}` and no `status`, sent
//!   bare or wrapped as `{"event": {...}, "run": {...}}`.
//!
//! One model serves both (serde aliases); unknown fields are ignored and the action is an open
//! enum, so a payload from a newer Port still decodes.

use serde::Deserialize;
use serde_json::{Map, Value};

/// What happened to the resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
    TimerExpired,
    /// An action this version does not know; kept, not rejected.
    Other(String),
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.as_str() {
            "CREATE" => Action::Create,
            "UPDATE" => Action::Update,
            "DELETE" => Action::Delete,
            "TIMER_EXPIRED" => Action::TimerExpired,
            _ => Action::Other(text),
        })
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Create => "CREATE",
            Action::Update => "UPDATE",
            Action::Delete => "DELETE",
            Action::TimerExpired => "TIMER_EXPIRED",
            Action::Other(other) => other,
        })
    }
}

/// Who or what caused the change.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Trigger {
    pub by: By,
    /// `UI`, `API`, `AUTOMATION`, ...
    pub origin: Option<String>,
    /// When, as Port wrote it (ISO 8601).
    pub at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct By {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Context {
    #[serde(alias = "blueprintIdentifier")]
    pub blueprint: Option<String>,
    #[serde(alias = "entityIdentifier")]
    pub entity: Option<String>,
    pub property_identifier: Option<String>,
    pub run_id: Option<String>,
}

/// An entity as Port snapshots it before or after a change.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Entity {
    pub identifier: Option<String>,
    pub title: Option<String>,
    pub blueprint: Option<String>,
    pub properties: Map<String, Value>,
    pub relations: Map<String, Value>,
    pub created_at: Option<String>,
    pub created_by: Option<String>,
    pub updated_at: Option<String>,
    pub updated_by: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct Diff {
    before: Option<Entity>,
    after: Option<Entity>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    action: Action,
    resource_type: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    trigger: Trigger,
    #[serde(default)]
    context: Context,
    #[serde(default)]
    diff: Diff,
}

/// One decoded change.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub action: Action,
    /// `entity`, `blueprint`, `run`, ...
    pub resource_type: String,
    /// Legacy shape only: `SUCCESS`, `FAILURE`.
    pub status: Option<String>,
    pub trigger: Trigger,
    pub context: Context,
    /// `None` on CREATE.
    pub before: Option<Entity>,
    /// `None` on DELETE.
    pub after: Option<Entity>,
    /// The payload as JSON, for jq conditions that look beyond the entity.
    pub raw: Value,
}

impl Change {
    /// The entity's blueprint, from the context or either snapshot.
    pub fn blueprint(&self) -> Option<&str> {
        self.context
            .blueprint
            .as_deref()
            .or_else(|| self.after.as_ref()?.blueprint.as_deref())
            .or_else(|| self.before.as_ref()?.blueprint.as_deref())
    }

    /// The entity's identifier, from the context or either snapshot.
    pub fn entity(&self) -> Option<&str> {
        self.context
            .entity
            .as_deref()
            .or_else(|| self.after.as_ref()?.identifier.as_deref())
            .or_else(|| self.before.as_ref()?.identifier.as_deref())
    }

    /// The entity's title (after the change, else before), else its identifier.
    pub fn title(&self) -> Option<&str> {
        self.after
            .as_ref()
            .and_then(|e| e.title.as_deref())
            .or_else(|| self.before.as_ref()?.title.as_deref())
            .or_else(|| self.entity())
    }
}

/// Why a body is not a Port change. Not an error of the relay: such events are simply not for
/// the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum NotPort {
    #[error("body is not JSON ({0})")]
    NotJson(serde_json::Error),
    /// Valid JSON, past what the parser takes: a sender's real event that cannot be read,
    /// which is worth a warning rather than a shrug.
    #[error(
        "body is JSON beyond what smee-relay reads ({0}): numbers must fit a 64-bit float and \
         nesting 128 levels"
    )]
    BeyondLimits(serde_json::Error),
    #[error("not a Port event ({0})")]
    Shape(serde_json::Error),
    /// Past [`MAX_BODY`]: never read into a tree (whose cost is many times the text's).
    #[error(
        "body of {} is larger than any Port change (Port takes no request over 1 MiB): not read, past {}",
        crate::source::mib(*.0),
        crate::source::mib(MAX_BODY)
    )]
    TooLarge(usize),
}

/// The largest body read as JSON: twice what Port takes in a request (1 MiB). A tree of
/// JSON values costs many times its text (a 16.7 MB body of small objects took 1.5 GB).
pub const MAX_BODY: usize = 2 << 20;

/// A body as JSON; a refusal says whether it is JSON at all or only past the parser's limits.
/// A UTF-8 byte order mark before it is skipped, as RFC 8259 (8.1) lets a parser do: an
/// editor or a script on Windows adds one, and serde_json refuses it (helper-152: a signed
/// body with one was a dead letter "not JSON").
pub fn read_json(body: &[u8]) -> Result<Value, NotPort> {
    if body.len() > MAX_BODY {
        return Err(NotPort::TooLarge(body.len()));
    }
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    serde_json::from_slice(body).map_err(|e| {
        // serde_json tells these apart only by message; `regression_…_beyond_the_json_limits`
        // (tests/pipeline.rs) holds it to them.
        let message = e.to_string();
        if message.starts_with("number out of range") || message.starts_with("recursion limit") {
            NotPort::BeyondLimits(e)
        } else {
            NotPort::NotJson(e)
        }
    })
}

/// Decode a webhook body as a Port change, bare or wrapped in `{"event": ...}`.
pub fn decode(body: &[u8]) -> Result<Change, NotPort> {
    let mut raw = read_json(body)?;
    if let Some(inner) = raw.get_mut("event").filter(|e| e.is_object()) {
        raw = inner.take();
    }
    let wire: Wire = serde_json::from_value(raw.clone()).map_err(NotPort::Shape)?;
    Ok(Change {
        action: wire.action,
        resource_type: wire.resource_type,
        status: wire.status,
        trigger: wire.trigger,
        context: wire.context,
        before: wire.diff.before,
        after: wire.diff.after,
        raw,
    })
}

#[cfg(test)]
mod tests {

    /// Regression (helper-127): a 16.7 MB body of small objects took the daemon from 78 MB to
    /// 1.5 GB (a tree of JSON values), and to 2.7 GB with the next, never given back. Port
    /// takes no request over 1 MiB, so no entity change is larger: a body past twice that is
    /// not read as one.
    #[test]
    fn regression_a_huge_body_was_read_into_a_tree_of_gigabytes() {
        let many: Vec<String> = (0..200_000).map(|i| format!("{{\"k\":{i}}}")).collect();
        let body = format!("{{\"arr\":[{}]}}", many.join(","));
        assert!(body.len() > MAX_BODY);
        let e = read_json(body.as_bytes()).unwrap_err();
        assert!(matches!(e, NotPort::TooLarge(n) if n == body.len()), "{e}");
        assert!(e.to_string().contains("larger than any Port change"), "{e}");
    }
    use super::*;

    /// Regression (helper-152): a body with a UTF-8 byte order mark before its JSON was
    /// "not JSON" to both Port routes.
    #[test]
    fn regression_a_byte_order_mark_made_a_port_change_not_json() {
        let body = fixture("automation", "02-cpu-25-to-87");
        let mut marked = b"\xEF\xBB\xBF".to_vec();
        marked.extend_from_slice(&body);
        let change = decode(&marked).expect("read past the mark");
        assert_eq!(change.entity(), decode(&body).unwrap().entity());
        // Only before the JSON, once: elsewhere it is what it is, not JSON.
        let mut twice = b"\xEF\xBB\xBF".to_vec();
        twice.extend_from_slice(&marked);
        assert!(matches!(read_json(&twice), Err(NotPort::NotJson(_))));
    }

    fn fixture(shape: &str, name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/port/deployment-config/{shape}/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    #[test]
    fn both_shapes_decode_to_the_same_change() {
        for name in ["01-create", "02-cpu-25-to-87", "09-delete"] {
            let legacy = decode(&fixture("legacy", name)).unwrap();
            let automation = decode(&fixture("automation", name)).unwrap();
            assert_eq!(legacy.action, automation.action, "{name}");
            assert_eq!(legacy.before, automation.before, "{name}");
            assert_eq!(legacy.after, automation.after, "{name}");
            assert_eq!(legacy.blueprint(), Some("DeploymentConfig"));
            assert_eq!(automation.entity(), Some("notification-service-prod"));
            assert_eq!(automation.title(), Some("Notification Service Production"));
        }
        let create = decode(&fixture("automation", "01-create")).unwrap();
        assert_eq!(create.action, Action::Create);
        assert!(create.before.is_none());
        let delete = decode(&fixture("legacy", "09-delete")).unwrap();
        assert_eq!(delete.action, Action::Delete);
        assert!(delete.after.is_none());
        assert_eq!(delete.status.as_deref(), Some("SUCCESS"));
    }

    #[test]
    fn unknown_actions_and_fields_still_decode() {
        let change = decode(
            br#"{"action":"ARCHIVE","resourceType":"entity","newField":1,"context":{"entity":"e"}}"#,
        )
        .unwrap();
        assert_eq!(change.action, Action::Other("ARCHIVE".into()));
        assert_eq!(change.entity(), Some("e"));
    }

    #[test]
    fn other_payloads_are_not_port_events() {
        assert!(matches!(decode(b"not json"), Err(NotPort::NotJson(_))));
        assert!(matches!(
            decode(br#"{"ref":"main","commits":[]}"#),
            Err(NotPort::Shape(_))
        ));
        assert!(matches!(decode(br#"[1]"#), Err(NotPort::Shape(_))));
    }
}
