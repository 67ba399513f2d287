//! smee-client's command line, for people who type `smee`: when the binary is invoked as `smee`
//! (the package installs a symlink), it takes smee-client 5's flags with their meanings and turns
//! them into `smee-relay forward`. It owns only the translation; `forward` does the work.
//!
//! smee-client 5 (`bin/smee.js`): `-v/--version` prints the bare version; `-u/--url` is the
//! channel (none: a new one is created and printed); `-t/--target` the full target URL, which
//! wins over `-p/--port` (default `$PORT`, else 3000) and `-P/--path` (default `/`);
//! `-q/--query-forwarding` forwards the query string (on by default: the flag is accepted and
//! changes nothing); `-h/--help`. smee-relay's own options are not accepted here: they go to
//! `smee-relay forward`.

use std::ffi::OsString;

use clap::{ArgAction, Parser};

use super::{Cli, Invocation};
use crate::url::{ChannelUrl, TargetUrl};

/// Forward webhooks from a smee.io channel to a local server (smee-client's command line,
/// relayed through smee-relay's spool: nothing lost, order kept). See `smee-relay forward --help`
/// for every option.
#[derive(Debug, Parser)]
#[command(
    name = "smee",
    disable_version_flag = true,
    override_usage = "smee [options]"
)]
pub struct SmeeArgs {
    /// Display the version number.
    #[arg(short = 'v', long, action = ArgAction::SetTrue)]
    pub version: bool,

    /// URL of the webhook proxy service. Default: https://smee.io/new
    #[arg(short = 'u', long, value_name = "url")]
    pub url: Option<ChannelUrl>,

    /// Full URL (including protocol and path) of the target service the events will be
    /// forwarded to. Default: http://127.0.0.1:PORT/PATH
    #[arg(short = 't', long, value_name = "target")]
    pub target: Option<TargetUrl>,

    /// Local HTTP server port. Default: $PORT, else 3000
    #[arg(short = 'p', long, value_name = "n", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// URL path to post proxied requests to.
    #[arg(short = 'P', long, value_name = "path", default_value = "/")]
    pub path: String,

    /// Forward query parameters from the source URL to the target URL. Default: true
    #[arg(short = 'q', long = "query-forwarding", action = ArgAction::SetTrue)]
    pub query_forwarding: bool,
}

impl SmeeArgs {
    /// The same request as `smee-relay forward` arguments.
    pub fn forward_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["smee-relay".into(), "forward".into()];
        if let Some(url) = &self.url {
            args.extend(["--url".into(), url.expose().as_str().into()]);
        }
        match &self.target {
            // smee-client: a target makes --port and --path irrelevant (no error).
            Some(target) => args.extend(["--target".into(), target.to_string().into()]),
            None => {
                if let Some(port) = self.port {
                    args.extend(["--port".into(), port.to_string().into()]);
                }
                args.extend([OsString::from("--path"), self.path.clone().into()]);
            }
        }
        args
    }
}

/// Parse `smee …` into the `forward` it means, or into printing the bare version for `-v`
/// (smee-client prints no program name).
pub fn parse(args: Vec<OsString>) -> Result<Invocation, clap::Error> {
    let smee = SmeeArgs::try_parse_from(args)?;
    if smee.version {
        return Ok(Invocation::Print(format!(
            "{}\n",
            env!("CARGO_PKG_VERSION")
        )));
    }
    Cli::try_parse_from(smee.forward_args()).map(|cli| Invocation::Run(Box::new(cli)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn forward(line: &str) -> crate::cli::ForwardArgs {
        let Ok(Invocation::Run(cli)) = parse(line.split_whitespace().map(Into::into).collect())
        else {
            panic!("{line}: not a run");
        };
        match cli.command {
            Command::Forward(forward) => forward,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn smee_clients_flags_mean_the_same() {
        let f = forward("smee -u https://smee.io/abc -t http://127.0.0.1:3000/events");
        assert_eq!(
            f.channel_url().unwrap().expose().as_str(),
            "https://smee.io/abc"
        );
        assert_eq!(
            f.target_url().unwrap().to_string(),
            "http://127.0.0.1:3000/events"
        );

        let f = forward("smee --url https://smee.io/abc --port 4000 --path /hook -q");
        assert_eq!(
            f.target_url().unwrap().to_string(),
            "http://127.0.0.1:4000/hook"
        );

        // A target wins over --port and --path, without a conflict (as in smee-client).
        let f = forward("smee -u https://smee.io/abc -t http://10.0.0.1:80/x -p 5 -P /y");
        assert_eq!(f.target_url().unwrap().to_string(), "http://10.0.0.1/x");

        // No -u: a new channel.
        assert!(forward("smee -p 4000").channel_url().is_none());
    }

    #[test]
    fn smee_v_prints_the_bare_version() {
        let printed = match parse(vec!["smee".into(), "-v".into()]) {
            Ok(Invocation::Print(text)) => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(printed, format!("{}\n", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn smee_refuses_what_smee_client_refuses() {
        for line in ["smee extra", "smee --bogus", "smee -u not-a-url"] {
            let args = line.split_whitespace().map(Into::into).collect();
            assert!(parse(args).is_err(), "{line}");
        }
    }

    #[test]
    fn the_smee_cli_is_well_formed() {
        use clap::CommandFactory as _;
        SmeeArgs::command().debug_assert();
    }
}
