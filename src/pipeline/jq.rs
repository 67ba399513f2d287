//! jq conditions (`when = '.properties.locked == true'`), evaluated with jaq, the way Port users
//! already write them in Automations.
//!
//! A condition is compiled once when the config is loaded, to report syntax errors with their
//! position, and again for each evaluation: jaq's compiled filters are not `Send`, and compiling
//! a one-line condition costs microseconds, which is nothing next to a webhook.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data, unwrap_valr};
use jaq_json::Val;

/// A syntax error in a condition, with the byte offset it was found at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at character {})", .offset + 1)]
pub struct JqError {
    pub offset: usize,
    pub message: String,
}

/// A jq condition that is known to compile.
#[derive(Clone, Debug)]
pub struct JqCondition {
    /// The source, recompiled for each evaluation.
    code: String,
}

type Filter = jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>;

fn compile(code: &str) -> Result<Filter, JqError> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let arena = Arena::default();
    let loader = Loader::new(defs);
    let at = |part: &str| {
        let start = part.as_ptr() as usize;
        let base = code.as_ptr() as usize;
        if start >= base && start <= base + code.len() {
            start - base
        } else {
            0
        }
    };
    let modules = loader
        .load(&arena, File { code, path: () })
        .map_err(|errors| {
            let (_, error) = errors.into_iter().next().expect("an error");
            match error {
                jaq_core::load::Error::Lex(errs) => errs.first().map(|(expect, found)| JqError {
                    offset: at(found),
                    message: format!("expected {}", expect.as_str()),
                }),
                jaq_core::load::Error::Parse(errs) => errs.first().map(|(expect, found)| JqError {
                    offset: at(found),
                    message: format!(
                        "expected {}{}",
                        expect.as_str(),
                        if found.is_empty() {
                            " before the end".to_string()
                        } else {
                            format!(", found {found:?}")
                        }
                    ),
                }),
                jaq_core::load::Error::Io(errs) => errs.first().map(|(path, e)| JqError {
                    offset: at(path),
                    message: e.clone(),
                }),
            }
            .unwrap_or(JqError {
                offset: 0,
                message: "invalid jq".into(),
            })
        })?;
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errors| {
            let undefined = errors.into_iter().flat_map(|(_, errs)| errs).next();
            match undefined {
                Some((name, kind)) => JqError {
                    offset: at(name),
                    message: format!("undefined {kind:?} {name}").to_lowercase(),
                },
                None => JqError {
                    offset: 0,
                    message: "invalid jq".into(),
                },
            }
        })
}

impl JqCondition {
    /// Check that `code` compiles.
    pub fn new(code: &str) -> Result<Self, JqError> {
        compile(code)?;
        Ok(Self {
            code: code.to_string(),
        })
    }

    pub fn code(&self) -> &str {
        &self.code
    }

    /// Whether the condition holds for `input`: its first output is truthy (not `false` or
    /// `null`). No output, or a runtime error, is an error.
    pub fn holds(&self, input: &serde_json::Value) -> Result<bool, String> {
        let filter = compile(&self.code).map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec(input).map_err(|e| e.to_string())?;
        let input = jaq_json::read::parse_single(&bytes).map_err(|e| format!("{e:?}"))?;
        let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
        let mut outputs = filter.id.run((ctx, input)).map(unwrap_valr);
        match outputs.next() {
            Some(Ok(value)) => Ok(jaq_core::ValT::as_bool(&value)),
            Some(Err(e)) => Err(format!("jq error: {e:?}")),
            None => Err("the condition produced no value".into()),
        }
    }
}

impl JqCondition {
    /// The first value the expression yields for `input`, as JSON (report mappings of
    /// `[[action]]`, which want a string or a list rather than a truth value).
    pub fn output(&self, input: &serde_json::Value) -> Result<serde_json::Value, String> {
        let filter = compile(&self.code).map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec(input).map_err(|e| e.to_string())?;
        let input = jaq_json::read::parse_single(&bytes).map_err(|e| format!("{e:?}"))?;
        let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
        let mut outputs = filter.id.run((ctx, input)).map(unwrap_valr);
        match outputs.next() {
            Some(Ok(value)) => serde_json::from_str(&value.to_string()).map_err(|e| e.to_string()),
            Some(Err(e)) => Err(format!("jq error: {e:?}")),
            None => Err("the expression produced no value".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_evaluate_like_jq() {
        let locked = JqCondition::new(".properties.locked == true").unwrap();
        assert_eq!(
            locked.holds(&json!({"properties": {"locked": true}})),
            Ok(true)
        );
        assert_eq!(
            locked.holds(&json!({"properties": {"locked": false}})),
            Ok(false)
        );
        assert_eq!(locked.holds(&json!(null)), Ok(false));
        let any = JqCondition::new(r#".properties.tags | any(. == "prod")"#).unwrap();
        assert_eq!(
            any.holds(&json!({"properties": {"tags": ["dev", "prod"]}})),
            Ok(true)
        );
        let cpu = JqCondition::new(".properties.cpuUtil > 80 and .title != null").unwrap();
        assert_eq!(
            cpu.holds(&json!({"title": "x", "properties": {"cpuUtil": 81}})),
            Ok(true)
        );
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = JqCondition::new(".properties.locked ==").unwrap_err();
        assert!(e.message.contains("expected"), "{e}");
        let e = JqCondition::new(".a | nosuchfn(1)").unwrap_err();
        assert_eq!(e.offset, 5, "{e}");
        assert!(e.message.contains("nosuchfn"), "{e}");
        assert!(JqCondition::new("if . then 1").is_err());
    }
}
