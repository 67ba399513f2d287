//! Slack incoming-webhook messages: Block Kit plus a coloured attachment, and a plain `text`
//! fallback with the same words (notifications and screen readers use it).

use serde_json::{Value, json};

use crate::pipeline::{Alert, AlertStatus};

/// The JSON body to POST to a Slack incoming webhook for `alert`.
pub fn message(alert: &Alert) -> Value {
    let color = match (alert.status, alert.severity.as_str()) {
        (AlertStatus::Resolved, _) => "#2eb67d",
        (AlertStatus::Firing, "critical") => "#e01e5a",
        (AlertStatus::Firing, _) => "#ecb22e",
    };
    let entity = match &alert.entity_url {
        Some(url) => format!("<{url}|{}>", escape(&alert.entity)),
        None => format!("`{}`", escape(&alert.entity)),
    };
    let mut fields = vec![
        field("Entity", &entity),
        field(
            "Blueprint",
            &escape(alert.blueprint.as_deref().unwrap_or("-")),
        ),
    ];
    if let Some(p) = &alert.property {
        fields.push(field(
            &escape(&p.property),
            &format!("{} → {}", escape(&p.before), escape(&p.after)),
        ));
    }
    fields.push(field("Condition", &escape(&alert.threshold)));
    fields.push(field("Severity", &escape(&alert.severity)));
    fields.push(field(
        "Triggered",
        &format!(
            "{} at {}",
            escape(alert.triggered_by.as_deref().unwrap_or("-")),
            escape(alert.triggered_at.as_deref().unwrap_or("-"))
        ),
    ));
    let mut details = vec![json!({"type": "section", "fields": fields})];
    let mut context = Vec::new();
    if let Some(note) = &alert.note {
        context.push(format!("_{}_", escape(note)));
    }
    if !alert.other_changes.is_empty() {
        let also: Vec<String> = alert
            .other_changes
            .iter()
            .map(|c| {
                format!(
                    "{}: {} → {}",
                    escape(&c.property),
                    escape(&c.before),
                    escape(&c.after)
                )
            })
            .collect();
        context.push(format!("Also changed: {}", also.join(", ")));
    }
    if !context.is_empty() {
        details.push(json!({
            "type": "context",
            "elements": context.iter().map(|t| json!({"type": "mrkdwn", "text": t})).collect::<Vec<_>>()
        }));
    }
    if !alert.links.is_empty() {
        let buttons: Vec<Value> = alert
            .links
            .iter()
            .take(25) // Slack's limit per actions block
            .map(|(name, url)| {
                json!({"type": "button", "text": {"type": "plain_text", "text": name}, "url": url})
            })
            .collect();
        details.push(json!({"type": "actions", "elements": buttons}));
    }
    let title = alert.headline();
    let fallback = match &alert.property {
        Some(p) => format!(
            "{title} ({} {} → {}, {})",
            p.property, p.before, p.after, alert.threshold
        ),
        None => format!("{title} ({})", alert.threshold),
    };
    json!({
        "text": fallback,
        "blocks": [{"type": "header", "text": {"type": "plain_text", "text": truncate(&title, 150)}}],
        "attachments": [{"color": color, "fallback": fallback, "blocks": details}],
    })
}

fn field(name: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": format!("*{name}*\n{value}")})
}

/// Slack's mrkdwn needs `&`, `<` and `>` escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        text.chars().take(max - 1).chain(['…']).collect()
    }
}
