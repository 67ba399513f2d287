//! `smee-relay generate completions|man DIR`: the shell completions and man pages the
//! package ships, written from the clap definitions so they never drift from the binary. It
//! writes files only into DIR.

use std::io::Write as _;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::{Cli, GenerateArgs, Generated, smee::SmeeArgs};

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let written = || format!("cannot write into {}", dir.display());
    match args.what {
        Generated::Completions => {
            for shell in [Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut Cli::command(), "smee-relay", dir)
                    .with_context(written)?;
            }
            std::fs::write(dir.join("smee-relay.bash"), bash_completions())
                .with_context(written)?;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut SmeeArgs::command(), "smee", dir)
                    .with_context(written)?;
            }
        }
        Generated::Man => {
            clap_mangen::generate_to(Cli::command(), dir).with_context(written)?;
            clap_mangen::generate_to(SmeeArgs::command(), dir).with_context(written)?;
        }
    }
    let (what, where_to) = match args.what {
        Generated::Completions => (
            "bash, zsh and fish completions",
            "each shell looks: *.bash to ~/.local/share/bash-completion/completions/ (without \
             .bash), _smee-relay and _smee to a directory in zsh's $fpath, *.fish to \
             ~/.config/fish/completions/",
        ),
        Generated::Man => ("man pages", "man looks, e.g. ~/.local/share/man/man1/"),
    };
    // Not eprintln!: it panics when stderr is a closed pipe.
    let _ = writeln!(
        std::io::stderr(),
        "wrote {what} into {}; copy them where {where_to}",
        dir.display()
    );
    Ok(())
}

/// `smee-relay`'s bash completions. clap_complete (4.6.12) spells the state of a hyphenated
/// program's subcommands two ways: `smee__relay__subcmd__events` where it walks the words, and
/// `smee__subcmd__relay__subcmd__events` in the branches that complete them, so nothing past
/// the subcommand's name completed (clap-rs/clap#6421). The branches are spelled as the walk.
fn bash_completions() -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(Shell::Bash, &mut Cli::command(), "smee-relay", &mut script);
    String::from_utf8_lossy(&script)
        .replace("smee__subcmd__relay", "smee__relay")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_pages_are_written() {
        let dir = tempfile::tempdir().unwrap();
        for what in [Generated::Completions, Generated::Man] {
            run(&GenerateArgs {
                what,
                dir: dir.path().to_path_buf(),
            })
            .unwrap();
        }
        for file in [
            "smee-relay.bash",
            "_smee-relay",
            "smee-relay.fish",
            "smee.bash",
            "smee-relay.1",
            "smee-relay-forward.1",
            "smee-relay-events.1",
            "smee.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(!text.is_empty(), "{file}");
        }
        // Regression (a new user's finding): bash completed the subcommand's name only.
        let complete = |line: &str| {
            let script = format!(
                "source {}/smee-relay.bash\nCOMP_WORDS=({line})\nCOMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n\
                 _smee__relay smee-relay \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
                 echo \"${{COMPREPLY[*]}}\"",
                dir.path().display()
            );
            let out = std::process::Command::new("bash")
                .args(["-c", &script])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(complete("smee-relay ev"), "events");
        assert_eq!(complete("smee-relay events l"), "list");
        assert!(complete("smee-relay run --con").contains("--config"));
        let man = std::fs::read_to_string(dir.path().join("smee-relay-forward.1")).unwrap();
        assert!(man.contains("query\\-forwarding"), "{man}");
    }
}
