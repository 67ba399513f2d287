//! What changed between an entity's before and after snapshots.

use serde_json::Value;

use super::port::Change;

/// One property whose value changed (or appeared, or went away).
#[derive(Clone, Debug, PartialEq)]
pub struct PropertyChange {
    pub name: String,
    /// `None`: the property was absent (or the entity did not exist).
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// The properties that differ between before and after, in the order they appear (after's
/// properties first, then those only before had).
pub fn properties(change: &Change) -> Vec<PropertyChange> {
    let empty = serde_json::Map::new();
    let before = change.before.as_ref().map_or(&empty, |e| &e.properties);
    let after = change.after.as_ref().map_or(&empty, |e| &e.properties);
    let mut out = Vec::new();
    for (name, value) in after {
        if before.get(name) != Some(value) {
            out.push(PropertyChange {
                name: name.clone(),
                before: before.get(name).cloned(),
                after: Some(value.clone()),
            });
        }
    }
    for (name, value) in before {
        if !after.contains_key(name) {
            out.push(PropertyChange {
                name: name.clone(),
                before: Some(value.clone()),
                after: None,
            });
        }
    }
    out
}

/// A value as a person reads it: strings without quotes, absent as `-`.
pub fn show(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::port::decode;

    #[test]
    fn only_changed_properties_are_listed() {
        let change = decode(
            br#"{"action":"UPDATE","resourceType":"entity","diff":{
                "before":{"properties":{"cpu":25,"health":"Healthy","gone":1,"same":"x"}},
                "after":{"properties":{"cpu":87,"health":"Healthy","new":true,"same":"x"}}}}"#,
        )
        .unwrap();
        let names: Vec<_> = properties(&change).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["cpu", "new", "gone"]);
    }

    #[test]
    fn create_and_delete_compare_against_nothing() {
        let create = decode(
            br#"{"action":"CREATE","resourceType":"entity","diff":{"before":null,"after":{"properties":{"cpu":25}}}}"#,
        )
        .unwrap();
        let diff = properties(&create);
        assert_eq!(diff[0].before, None);
        assert_eq!(show(diff[0].after.as_ref()), "25");
    }
}
