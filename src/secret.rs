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
