//! Rules: which entities they watch, and what the entity after a change says about them.
//!
//! A rule only judges ([`Verdict`]); what to send follows from the verdict and the alert's state
//! (see `state`). Thresholds have hysteresis: between `clear_below` and `above` the verdict is
//! [`Verdict::Keep`], so a value hovering around the threshold neither fires nor resolves.

use std::time::Duration;

use serde_json::Value;

use super::jq::{JqCondition, JqEngine};
use super::port::Change;

/// A compiled `[[rule]]`.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Unique; names the alert.
    pub name: String,
    /// Only entities of this blueprint, if set.
    pub blueprint: Option<String>,
    pub condition: Condition,
    /// How long the condition must hold before firing.
    pub hold: Duration,
    pub severity: String,
    /// Where it was written (`config.toml:12`), for messages about it.
    pub origin: String,
}

/// What makes a rule fire.
#[derive(Clone, Debug)]
pub enum Condition {
    Above {
        property: String,
        above: f64,
        clear_below: f64,
    },
    Below {
        property: String,
        below: f64,
        clear_above: f64,
    },
    In {
        property: String,
        values: Vec<Value>,
    },
    NotIn {
        property: String,
        values: Vec<Value>,
    },
    /// A jq condition over the entity after the change.
    When(JqCondition),
}

/// What a rule makes of an entity's state after a change.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The condition holds: fire (after the hold).
    Bad,
    /// The condition does not hold: resolve.
    Good,
    /// Inside the hysteresis band: whatever the state is, it stays.
    Keep,
    /// The rule cannot judge (missing property, wrong type); state stays.
    Skip(String),
    /// The rule's jq condition failed for this entity (a jq error, no value, or a bound
    /// exceeded: time, memory, recursion); state stays, and the failure is counted.
    Failed {
        /// A fixed word for the kind of failure (`timeout`, `bound`, `error`...), a metrics label.
        kind: &'static str,
        /// The failure in words.
        reason: String,
    },
}

/// For each byte of jq `code`, whether it is inside a string literal (`"..."`, with `\"`):
/// the opening quote is not, the text and the closing quote are.
fn in_string_literal(code: &str) -> Vec<bool> {
    let (mut inside, mut escaped) = (false, false);
    code.bytes()
        .map(|b| {
            let here = inside;
            if !inside {
                inside = b == b'"';
            } else if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                inside = false;
            }
            here
        })
        .collect()
}

impl Rule {
    /// A warning for a `when` that reads what it is never given: it sees the entity after the
    /// change (`.properties`, `.identifier`...), not the webhook's body, so `.diff`, `.event`
    /// or `.context` there are always null and the condition silently never holds.
    pub fn when_hint(&self) -> Option<String> {
        let Condition::When(condition) = &self.condition else {
            return None;
        };
        let code = condition.code();
        // `.diff` at the root of a path: not `.properties.diff` (a property may be named so),
        // not inside a string literal; `.["diff"]` and `getpath(["diff", ...])` too.
        let literal = in_string_literal(code);
        let read: Vec<String> = ["diff", "event", "context", "trigger"]
            .into_iter()
            .filter(|field| {
                let dotted = format!(".{field}");
                let rooted = code.match_indices(&dotted).any(|(at, _)| {
                    let before = code[..at].chars().next_back();
                    let after = code[at + dotted.len()..].chars().next();
                    !literal[at]
                        && before.is_none_or(|c| !(c.is_alphanumeric() || "_]).\"?".contains(c)))
                        && after.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
                });
                let indexed = [format!(".[\"{field}\"]"), format!("getpath([\"{field}\"")]
                    .iter()
                    .any(|form| {
                        code.match_indices(form.as_str())
                            .any(|(at, _)| !literal[at])
                    });
                rooted || indexed
            })
            .map(|field| format!(".{field}"))
            .collect();
        (!read.is_empty()).then(|| {
            format!(
                "rule {:?}: `when` reads {}, which it is never given: it sees the entity after the change (`.properties.NAME`, `.identifier`), not the webhook's body, so this is null there; a rule fires on the way into its condition and resolves on the way out, which is the transition",
                self.name,
                read.join(", ")
            )
        })
    }

    /// What the rule judges, as text: everything but its name and where it is written. Two
    /// rules with the same meaning judge alike (the cluster's config fingerprint, a reload's
    /// account of what changed).
    pub fn meaning(&self) -> String {
        format!(
            "{:?} {:?} {:?} {:?}",
            self.blueprint, self.condition, self.hold, self.severity
        )
    }

    /// Whether this rule watches the entity of `change`.
    pub fn watches(&self, change: &Change) -> bool {
        change.resource_type == "entity"
            && self
                .blueprint
                .as_deref()
                .is_none_or(|b| change.blueprint() == Some(b))
    }

    /// The property this rule watches, if it watches one.
    pub fn property(&self) -> Option<&str> {
        match &self.condition {
            Condition::Above { property, .. }
            | Condition::Below { property, .. }
            | Condition::In { property, .. }
            | Condition::NotIn { property, .. } => Some(property),
            Condition::When(_) => None,
        }
    }

    /// The condition in words, for alerts: `above 80 (clears below 70)`.
    pub fn threshold(&self) -> String {
        let list = |values: &[Value]| {
            values
                .iter()
                .map(|v| super::diff::show(Some(v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.condition {
            Condition::Above {
                above, clear_below, ..
            } if clear_below < above => format!("above {above} (clears below {clear_below})"),
            Condition::Above { above, .. } => format!("above {above}"),
            Condition::Below {
                below, clear_above, ..
            } if clear_above > below => format!("below {below} (clears above {clear_above})"),
            Condition::Below { below, .. } => format!("below {below}"),
            Condition::In { values, .. } => format!("in [{}]", list(values)),
            Condition::NotIn { values, .. } => format!("not in [{}]", list(values)),
            Condition::When(jq) => format!("when {}", jq.code()),
        }
    }

    /// Judge the entity after `change`. Only for changes this rule [`Rule::watches`], and not
    /// for deletions (those resolve by themselves). A `when` condition runs on `jq`, which may
    /// block for up to its time budget.
    pub fn judge(&self, change: &Change, jq: &JqEngine) -> Verdict {
        let after = change.after.as_ref();
        let value = |property: &str| after.and_then(|e| e.properties.get(property));
        let number = |property: &str| -> Result<f64, Verdict> {
            match value(property) {
                None => Err(Verdict::Skip(format!("property {property} is missing"))),
                Some(v) => v.as_f64().ok_or_else(|| {
                    Verdict::Skip(format!("property {property} is not a number ({v})"))
                }),
            }
        };
        let judged = match &self.condition {
            Condition::Above {
                property,
                above,
                clear_below,
            } => number(property).map(|v| {
                if v > *above {
                    Verdict::Bad
                } else if v < *clear_below {
                    Verdict::Good
                } else {
                    Verdict::Keep
                }
            }),
            Condition::Below {
                property,
                below,
                clear_above,
            } => number(property).map(|v| {
                if v < *below {
                    Verdict::Bad
                } else if v > *clear_above {
                    Verdict::Good
                } else {
                    Verdict::Keep
                }
            }),
            Condition::In { property, values } | Condition::NotIn { property, values } => {
                match value(property) {
                    None => Err(Verdict::Skip(format!("property {property} is missing"))),
                    Some(v) => {
                        let listed = values.contains(v);
                        let bad = listed == matches!(self.condition, Condition::In { .. });
                        Ok(if bad { Verdict::Bad } else { Verdict::Good })
                    }
                }
            }
            Condition::When(condition) => {
                let input = change
                    .raw
                    .pointer("/diff/after")
                    .cloned()
                    .unwrap_or(Value::Null);
                match jq.holds(condition, &input) {
                    Ok(true) => Ok(Verdict::Bad),
                    Ok(false) => Ok(Verdict::Good),
                    Err(e) => Err(Verdict::Failed {
                        kind: e.kind(),
                        reason: crate::error::chain(&e),
                    }),
                }
            }
        };
        judged.unwrap_or_else(|skip| skip)
    }
}

#[cfg(test)]
mod tests {
    /// The warning of a rule whose `when` is `code` (helper-117's finding; helper-120's false
    /// positives and misses).
    fn hint(code: &str) -> Option<String> {
        let pipeline = crate::pipeline::tests::with_rules(&format!(
            "[[rule]]\nname = \"r\"\nwhen = '{code}'\n"
        ));
        pipeline.rules[0].when_hint()
    }

    #[test]
    fn a_when_that_reads_the_body_warns_and_a_property_of_that_name_does_not() {
        for reads in [
            ".diff.before.properties.x == 1",
            "(.event.action) == \"DELETE\"",
            ".[\"diff\"] != null",
            "getpath([\"event\",\"action\"]) == \"DELETE\"",
            ".properties.x == 1 and .context != null",
        ] {
            assert!(hint(reads).is_some(), "{reads}");
        }
        for fine in [
            ".properties.diff == true",
            ".properties.event == \"x\"",
            ".identifier == \"a.diff\"",
            ".properties.differences > 1",
            ".properties[\"event\"] == 1",
        ] {
            assert_eq!(hint(fine), None, "{fine}");
        }
    }
}
