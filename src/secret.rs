//! One type for secrets: bearer tokens, the Port client secret, channel and Slack webhook URLs
//! as the config holds them. `Debug` prints `[REDACTED]` and there is no `Display`, so a secret
//! reaches a log line only through an explicit `expose_secret()` at the point of use (an HTTP
//! header, an HMAC key), never by accident in a `{:?}` of a config or of the parsed arguments.

pub use secrecy::{ExposeSecret, SecretString};

/// A clap value parser for secret arguments (`--token`): the value goes straight into a
/// [`SecretString`], so `{:?}` of the parsed command line shows no secret.
pub fn parse_arg(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}

/// [`parse_arg`] for a bearer token, which cannot be empty: `serve` given an empty one
/// let in anyone who sent `Authorization: Bearer ` (helper-152: an empty
/// `SMEE_RELAY_SERVE_POST_TOKEN`, as an env file's `KEY=` line makes, was taken, and for
/// posters it overrides `--token`).
pub fn parse_token(value: &str) -> Result<SecretString, String> {
    if value.trim() != value && !value.trim().is_empty() {
        // No request can carry them: HTTP drops a header value's trailing spaces, and the
        // server skips those after `Bearer` (helper-156: `abc\r` from a CRLF env file was
        // taken, and every request refused).
        return Err(
            "a token cannot start or end with spaces, tabs or line ends (no request \
                    could carry them; a `\\r` often comes from an env file saved with CRLF \
                    line ends): remove them"
                .to_string(),
        );
    }
    if value.trim().is_empty() {
        return Err(
            "a token cannot be empty or blank (it would let in anyone who sends \
                    `Authorization: Bearer `): give one. If it came from the option's \
                    variable (an env file's `KEY=` line sets it empty; `--help` names it), \
                    remove that line to require none"
                .to_string(),
        );
    }
    Ok(SecretString::from(value))
}
