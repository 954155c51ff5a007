//! `actwatch`: the command line. Parses arguments, then calls the library crates; no logic of its
//! own beyond formatting reports.
//!
//! Layout: [`cli`] defines the commands, [`config`] resolves `serve`'s settings, [`commands`] holds
//! one module per command, [`report`] and [`progress`] what they print, [`plot`] the SVG of `eval`;
//! this file only dispatches.

mod cli;
mod commands;
mod config;
mod plot;
mod progress;
mod report;
#[cfg(feature = "torch")]
mod torch;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Fit(a) => commands::fit::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Demo => commands::demo::run(),
        Command::Serve(a) => commands::serve::run(a),
        Command::Token(a) => commands::token::run(a),
        #[cfg(feature = "torch")]
        Command::Capture(a) => torch::capture(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
