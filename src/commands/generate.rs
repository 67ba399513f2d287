//! `smee-relay generate completions|man DIR` (hidden): the shell completions and man pages the
//! package ships, written from the clap definitions so they never drift from the binary. It
//! writes files only into DIR.

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
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut Cli::command(), "smee-relay", dir)
                    .with_context(written)?;
                clap_complete::generate_to(shell, &mut SmeeArgs::command(), "smee", dir)
                    .with_context(written)?;
            }
        }
        Generated::Man => {
            clap_mangen::generate_to(Cli::command(), dir).with_context(written)?;
            clap_mangen::generate_to(SmeeArgs::command(), dir).with_context(written)?;
        }
    }
    Ok(())
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
        let man = std::fs::read_to_string(dir.path().join("smee-relay-forward.1")).unwrap();
        assert!(man.contains("query\\-forwarding"), "{man}");
        // The hidden subcommand documents nothing.
        assert!(!dir.path().join("smee-relay-generate.1").exists());
    }
}
