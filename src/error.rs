//! Errors as people read them: one line with every cause, outermost first.

/// An error and its causes on one line, e.g. `cannot reach http://127.0.0.1:3000/hook: error
/// sending request: connection refused (os error 111)`. reqwest's own message alone is often
/// just "error sending request"; a cause already contained in the line is not repeated.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
