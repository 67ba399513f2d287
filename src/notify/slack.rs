//! Slack incoming-webhook messages: Block Kit plus a coloured attachment, and a plain `text`
//! fallback with the same words (notifications and screen readers use it).
//!
//! Slack answers 400 to a message over any Block Kit limit, which would turn the alert into a
//! dead letter; so every block is fitted to Slack's limits here ([`fit_blocks`]), cutting with
//! an ellipsis. The plain `text` is never cut: it keeps the full words.

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
            &escape(&values(&p.before, &p.after)),
        ));
    }
    fields.push(field("Condition", &escape(&alert.threshold)));
    fields.push(field("Severity", &escape(&alert.severity)));
    // Only what is known (helper-153: a reconciliation's alert, by no one, read "- at ...").
    let triggered = match (&alert.triggered_by, &alert.triggered_at) {
        (Some(by), Some(at)) => Some(format!("{} at {}", escape(by), escape(at))),
        (Some(one), None) | (None, Some(one)) => Some(escape(one)),
        (None, None) => None,
    };
    if let Some(triggered) = triggered {
        fields.push(field("Triggered", &triggered));
    }
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
    // One actions block holds at most 25 buttons: more links take more blocks.
    for links in alert.links.chunks(limits::BUTTONS_PER_ACTIONS) {
        let buttons: Vec<Value> = links
            .iter()
            .map(|(name, url)| {
                json!({"type": "button", "text": {"type": "plain_text", "text": name}, "url": url})
            })
            .collect();
        details.push(json!({"type": "actions", "elements": buttons}));
    }
    let title = alert.headline();
    // Slack reads the notification text as mrkdwn: escaped, as the blocks are.
    // A RESOLVED's condition is the one that no longer holds (helper-140: "91 → 75, above
    // 80"); one resolved for another reason (its note: the rule removed, the entity deleted)
    // may hold still (helper-145: "50 → 91, no longer above 80").
    // One found by reconciliation is resolved by its condition too (helper-157: it read
    // "85 → 50, above 80"); and a negated condition ends without a double negative.
    let condition_ended =
        (alert.note.as_deref()).is_none_or(|note| note.starts_with("found by reconciliation"));
    let condition = match alert.status {
        AlertStatus::Resolved if condition_ended => {
            if let Some(jq) = alert.threshold.strip_prefix("when ") {
                format!("no longer true: {jq}")
            } else if let Some(holds) = alert.threshold.strip_prefix("not ") {
                format!("{holds} again")
            } else {
                format!("no longer {}", alert.threshold)
            }
        }
        _ => alert.threshold.clone(),
    };
    let mut fallback = match &alert.property {
        Some(p) => format!(
            "{title} ({} {}, {condition})",
            p.property,
            values(&p.before, &p.after)
        ),
        None => format!("{title} ({condition})"),
    };
    // Why it was sent when that is not the change itself ("entity deleted", "its rule was
    // removed from the config", "found by reconciliation..."): a notification shows only this.
    if let Some(note) = &alert.note {
        fallback.push_str(&format!(": {note}"));
    }
    let fallback = escape(&fallback);
    let mut header = vec![json!({"type": "header", "text": {"type": "plain_text", "text": title}})];
    fit_blocks(&mut header);
    fit_blocks(&mut details);
    json!({
        "text": fallback,
        "blocks": header,
        "attachments": [{"color": color, "fallback": fallback, "blocks": details}],
    })
}

/// Slack's Block Kit limits (https://api.slack.com/reference/block-kit), in characters.
pub mod limits {
    /// Blocks in one message (or one attachment).
    pub const BLOCKS: usize = 50;
    /// A header block's text.
    pub const HEADER_TEXT: usize = 150;
    /// A section's text, and any other text object (context elements).
    pub const SECTION_TEXT: usize = 3000;
    /// Each of a section's fields.
    pub const FIELD_TEXT: usize = 2000;
    /// Fields in one section.
    pub const FIELDS: usize = 10;
    /// Elements in one context block.
    pub const CONTEXT_ELEMENTS: usize = 10;
    /// A button's label.
    pub const BUTTON_TEXT: usize = 75;
    /// A button's URL: a cut URL would lead somewhere else, so a longer one drops the button.
    pub const BUTTON_URL: usize = 3000;
    /// Buttons in one actions block.
    pub const BUTTONS_PER_ACTIONS: usize = 25;
}

/// Fit `blocks` to Slack's limits: texts cut with an ellipsis, lists cut to their maximum, and
/// past 50 blocks the last one kept says how many were left out.
pub fn fit_blocks(blocks: &mut Vec<Value>) {
    if blocks.len() > limits::BLOCKS {
        let left_out = blocks.len() - (limits::BLOCKS - 1);
        blocks.truncate(limits::BLOCKS - 1);
        blocks.push(json!({
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": format!("_{left_out} more blocks not shown_")}]
        }));
    }
    for block in blocks {
        match block["type"].as_str() {
            Some("header") => fit_text(&mut block["text"], limits::HEADER_TEXT),
            Some("section") => {
                if block.get("text").is_some() {
                    fit_text(&mut block["text"], limits::SECTION_TEXT);
                }
                if let Some(fields) = block.get_mut("fields").and_then(Value::as_array_mut) {
                    fields.truncate(limits::FIELDS);
                    fields
                        .iter_mut()
                        .for_each(|f| fit_text(f, limits::FIELD_TEXT));
                }
            }
            Some("context") => {
                if let Some(elements) = block.get_mut("elements").and_then(Value::as_array_mut) {
                    elements.truncate(limits::CONTEXT_ELEMENTS);
                    elements
                        .iter_mut()
                        .for_each(|e| fit_text(e, limits::SECTION_TEXT));
                }
            }
            Some("actions") => {
                if let Some(elements) = block.get_mut("elements").and_then(Value::as_array_mut) {
                    elements.retain(|b| {
                        b["url"]
                            .as_str()
                            .is_none_or(|u| u.chars().count() <= limits::BUTTON_URL)
                    });
                    elements.truncate(limits::BUTTONS_PER_ACTIONS);
                    elements
                        .iter_mut()
                        .for_each(|b| fit_text(&mut b["text"], limits::BUTTON_TEXT));
                }
            }
            _ => {}
        }
    }
}

/// Cut a text object's `text` to `max` characters.
fn fit_text(object: &mut Value, max: usize) {
    let mrkdwn = object["type"] == "mrkdwn";
    if let Some(text) = object.get_mut("text")
        && let Some(s) = text.as_str()
        && s.chars().count() > max
    {
        *text = Value::String(truncate(s, max, mrkdwn));
    }
}

/// A property's values: `before → after`, or `value (unchanged)` when the rule judged a
/// change of another property (helper-157: a rule added by a reload read "30 → 30").
fn values(before: &str, after: &str) -> String {
    match before == after {
        true => format!("{after} (unchanged)"),
        false => format!("{before} → {after}"),
    }
}

fn field(name: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": format!("*{name}*\n{value}")})
}

/// Slack's mrkdwn needs `&`, `<` and `>` escaped; and a value from Port shows no control or
/// bidi characters (a forged line, reversed text), as in the logs.
fn escape(text: &str) -> String {
    crate::text::escape_control(text)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `text` cut to at most `max` characters, the last being `…`. In mrkdwn the cut never splits
/// an escape (`&amp;`) or a link (`<url|label>`): those are dropped whole.
fn truncate(text: &str, max: usize, mrkdwn: bool) -> String {
    let std::borrow::Cow::Owned(mut kept) = crate::text::cut(text, max) else {
        return text.to_string();
    };
    if mrkdwn {
        kept.pop(); // the `…`, put back after the cut is mended
        if let Some(amp) = kept.rfind('&')
            && !kept[amp..].contains(';')
        {
            kept.truncate(amp);
        }
        if let Some(open) = kept.rfind('<')
            && !kept[open..].contains('>')
        {
            kept.truncate(open);
        }
        kept.push('…');
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::ShownChange;

    fn alert() -> Alert {
        Alert {
            status: AlertStatus::Firing,
            rule: "cpu-high".into(),
            severity: "critical".into(),
            entity: "svc-prod".into(),
            title: "Notification Service".into(),
            blueprint: Some("service".into()),
            property: Some(ShownChange {
                property: "cpuUtil".into(),
                before: "60".into(),
                after: "95".into(),
            }),
            threshold: "above 80".into(),
            other_changes: vec![],
            action: "UPDATE".into(),
            triggered_by: Some("alice".into()),
            triggered_at: Some("2026-11-29T10:00:00Z".into()),
            entity_url: None,
            links: vec![],
            note: None,
        }
    }

    fn chars(value: &Value) -> usize {
        value.as_str().unwrap().chars().count()
    }

    fn details(message: &Value) -> &Vec<Value> {
        message["attachments"][0]["blocks"].as_array().unwrap()
    }

    /// Regression (an adversary's finding): the notification text (`text`, and the
    /// attachment's `fallback`) carried an entity's title and values unescaped; Slack reads it
    /// as mrkdwn, so a title of `<!channel>` pinged everyone and `<https://x|y>` made a link.
    /// Regression (helper-153): an alert with no one who triggered it (a reconciliation's)
    /// said "- at 2026-...", and one with neither "- at -".
    #[test]
    fn regression_the_triggered_field_said_dashes_for_what_is_not_known() {
        let triggered = |alert: &Alert| {
            let message = message(alert);
            let fields = details(&message)[0]["fields"].as_array().unwrap().clone();
            fields
                .iter()
                .map(|f| f["text"].as_str().unwrap().to_string())
                .find(|t| t.starts_with("*Triggered*"))
        };
        let mut alert = alert();
        assert_eq!(
            triggered(&alert).as_deref(),
            Some("*Triggered*\nalice at 2026-11-29T10:00:00Z")
        );
        alert.triggered_by = None;
        assert_eq!(
            triggered(&alert).as_deref(),
            Some("*Triggered*\n2026-11-29T10:00:00Z")
        );
        alert.triggered_at = None;
        assert_eq!(triggered(&alert), None);
    }

    /// Regression (helper-157): a rule judging a change of another property (added by a
    /// reload while its property was already past the threshold) read "memoryUtil 30 → 30".
    #[test]
    fn regression_an_unchanged_value_read_as_a_change_to_itself() {
        let mut alert = alert();
        alert.property = Some(ShownChange {
            property: "memoryUtil".into(),
            before: "30".into(),
            after: "30".into(),
        });
        let message = message(&alert);
        let text = message["text"].as_str().unwrap();
        assert!(
            text.contains("(memoryUtil 30 (unchanged), above 80)"),
            "{text}"
        );
        let fields = details(&message)[0]["fields"].to_string();
        assert!(
            fields.contains("30 (unchanged)") && !fields.contains("30 → 30"),
            "{fields}"
        );
    }

    #[test]
    fn regression_the_notification_text_is_escaped_like_the_blocks() {
        let mut alert = alert();
        alert.title = "<!channel> & <https://evil.example|click>".into();
        alert.property.as_mut().unwrap().after = "<@U123>".into();
        let message = message(&alert);
        for text in [&message["text"], &message["attachments"][0]["fallback"]] {
            let text = text.as_str().unwrap();
            assert!(!text.contains(['<', '>']), "{text}");
            assert!(
                text.contains("&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;")
                    && text.contains("&lt;@U123&gt;"),
                "{text}"
            );
        }
        // The header is plain text, which Slack shows as it is.
        assert_eq!(message["blocks"][0]["text"]["text"], alert.headline());
    }

    /// Regression (helper-127): an entity's title with a line break and a right-to-left
    /// override reached Slack's header and notification text as they were (a forged second
    /// line, reversed text), and the alert printed on stdout too.
    #[test]
    fn regression_control_characters_of_a_title_reached_slack() {
        let mut alert = alert();
        alert.title = "gnp.exe\u{202e}\nFIRING fake".into();
        alert.entity = "id\nfake".into();
        let message = message(&alert);
        let said = [
            message["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .to_string(),
            message["text"].as_str().unwrap().to_string(),
            message["blocks"][1].to_string(),
            super::super::text(&alert),
        ];
        for text in said {
            let body = text.trim_end_matches('\n');
            assert!(!body.contains('\u{202e}'), "{text}");
            assert!(
                !body.contains("\nFIRING fake") && !body.contains("id\nfake"),
                "{text}"
            );
        }
    }

    /// Regression (helper-140): a RESOLVED's notification read "(cpuUtil 91 → 75, above
    /// 80)", as if 75 were above 80: the condition it names is the one that no longer holds.
    #[test]
    fn regression_a_resolved_read_as_if_its_condition_held() {
        let mut alert = alert();
        let text = |alert: &Alert| message(alert)["text"].as_str().unwrap().to_string();
        assert!(text(&alert).ends_with("(cpuUtil 60 → 95, above 80)"));
        alert.status = AlertStatus::Resolved;
        alert.property = Some(ShownChange {
            property: "cpuUtil".into(),
            before: "91".into(),
            after: "75".into(),
        });
        assert!(
            text(&alert).ends_with("(cpuUtil 91 → 75, no longer above 80)"),
            "{}",
            text(&alert)
        );
        alert.property = None;
        assert!(text(&alert).ends_with("(no longer above 80)"));
        // helper-146: "(no longer when .properties.healthStatus != ...)".
        alert.threshold = "when .properties.healthStatus != \"Healthy\"".into();
        assert!(
            text(&alert).ends_with("(no longer true: .properties.healthStatus != \"Healthy\")"),
            "{}",
            text(&alert)
        );
        // helper-157: found by reconciliation, it read as if the condition still held; and
        // a negated one read "no longer not in [Healthy]".
        alert.threshold = "above 80".into();
        alert.note = Some("found by reconciliation after a gap: ...".into());
        assert!(
            text(&alert).contains("(no longer above 80): found by reconciliation"),
            "{}",
            text(&alert)
        );
        alert.threshold = "not in [Healthy]".into();
        assert!(
            text(&alert).contains("(in [Healthy] again): found by reconciliation"),
            "{}",
            text(&alert)
        );
        // helper-145: resolved because its rule was removed, the value still above.
        alert.threshold = "above 80".into();
        alert.note = Some("its rule was removed from the config".into());
        assert!(
            text(&alert).ends_with("(above 80): its rule was removed from the config"),
            "{}",
            text(&alert)
        );
    }

    /// Regression (helper-120): an alert's note ("its rule was removed from the config",
    /// "entity deleted") was only in a context block, not in the notification text.
    #[test]
    fn regression_the_note_was_missing_from_the_notification_text() {
        let mut alert = alert();
        alert.note = Some("its rule was removed from the config".into());
        let message = message(&alert);
        for text in [&message["text"], &message["attachments"][0]["fallback"]] {
            let text = text.as_str().unwrap();
            assert!(
                text.ends_with(": its rule was removed from the config"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_long_title_is_cut_to_150_in_the_header_and_kept_whole_in_text() {
        let mut alert = alert();
        alert.title = "word ".repeat(100);
        let message = message(&alert);
        let header = &message["blocks"][0]["text"]["text"];
        assert_eq!(chars(header), limits::HEADER_TEXT);
        assert!(header.as_str().unwrap().ends_with('…'));
        assert!(message["text"].as_str().unwrap().contains(&alert.title));
    }

    #[test]
    fn a_long_property_value_is_cut_to_2000_in_its_field_and_kept_whole_in_text() {
        let mut alert = alert();
        let value = "x".repeat(5000);
        alert.property.as_mut().unwrap().after = value.clone();
        let message = message(&alert);
        let fields = details(&message)[0]["fields"].as_array().unwrap();
        let field = fields
            .iter()
            .find(|f| f["text"].as_str().unwrap().starts_with("*cpuUtil*"))
            .unwrap();
        assert_eq!(chars(&field["text"]), limits::FIELD_TEXT);
        assert!(field["text"].as_str().unwrap().ends_with('…'));
        assert!(message["text"].as_str().unwrap().contains(&value));
    }

    #[test]
    fn a_long_section_text_is_cut_to_3000() {
        let mut blocks = vec![json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": "y".repeat(4000)}
        })];
        fit_blocks(&mut blocks);
        assert_eq!(chars(&blocks[0]["text"]["text"]), limits::SECTION_TEXT);
    }

    #[test]
    fn long_other_changes_are_cut_to_3000_in_context_without_half_an_escape() {
        let mut alert = alert();
        alert.other_changes = (0..200)
            .map(|i| ShownChange {
                property: format!("property{i}"),
                before: "a & b".into(),
                after: "c < d".into(),
            })
            .collect();
        let message = message(&alert);
        let context = details(&message)
            .iter()
            .find(|b| b["type"] == "context")
            .unwrap();
        let text = context["elements"][0]["text"].as_str().unwrap();
        assert!(text.chars().count() <= limits::SECTION_TEXT);
        // The cut never leaves half an escape behind.
        let before_ellipsis = text.trim_end_matches('…');
        assert!(!before_ellipsis.ends_with('&'));
        assert!(
            before_ellipsis
                .rfind('&')
                .is_none_or(|i| before_ellipsis[i..].contains(';'))
        );
    }

    #[test]
    fn a_long_link_name_is_cut_to_75_on_its_button() {
        let mut alert = alert();
        let name = "Grafana dashboard for the notification service ".repeat(4);
        alert.links = vec![(name.clone(), "https://grafana.example.com/d/1".into())];
        let message = message(&alert);
        let actions = details(&message)
            .iter()
            .find(|b| b["type"] == "actions")
            .unwrap();
        let label = &actions["elements"][0]["text"]["text"];
        assert_eq!(chars(label), limits::BUTTON_TEXT);
        assert!(label.as_str().unwrap().ends_with('…'));
    }

    #[test]
    fn more_than_25_links_take_more_actions_blocks_none_lost() {
        let mut alert = alert();
        alert.links = (0..30)
            .map(|i| (format!("link {i}"), format!("https://example.com/{i}")))
            .collect();
        let message = message(&alert);
        let buttons: usize = details(&message)
            .iter()
            .filter(|b| b["type"] == "actions")
            .map(|b| b["elements"].as_array().unwrap().len())
            .inspect(|n| assert!(*n <= limits::BUTTONS_PER_ACTIONS))
            .sum();
        assert_eq!(buttons, 30);
    }

    #[test]
    fn more_than_50_blocks_keep_49_and_say_how_many_were_left_out() {
        let mut blocks: Vec<Value> = (0..60)
            .map(|i| json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("{i}")}}))
            .collect();
        fit_blocks(&mut blocks);
        assert_eq!(blocks.len(), limits::BLOCKS);
        assert_eq!(blocks[48]["text"]["text"], "48");
        assert_eq!(
            blocks[49]["elements"][0]["text"],
            "_11 more blocks not shown_"
        );
    }

    #[test]
    fn a_message_within_limits_is_unchanged() {
        let message = message(&alert());
        assert_eq!(
            message["blocks"][0]["text"]["text"],
            "FIRING cpu-high: Notification Service"
        );
        assert_eq!(details(&message)[0]["fields"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn mrkdwn_cuts_never_split_a_link() {
        let text = format!("see <https://example.com/{}|here>", "p".repeat(100));
        let cut = truncate(&text, 40, true);
        assert_eq!(cut, "see …");
    }
}
