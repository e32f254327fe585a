//! `keepnet`: the command that starts, watches and measures a keepnet constellation.
//!
//! Only the subcommands that work are wired in; see DESIGN.md, "The keepnet command".
#![deny(unsafe_code)]

mod bench;
mod cli;
mod config;
mod ctl;
mod error;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::BenchPeer(args) => bench::ipc::peer::run_peer(args),
        Command::UdpProbe(args) => bench::probe::run(args),
        Command::UdpEchoServer(args) => bench::udp_echo::run(args),
        Command::TcpProbe(args) => bench::tcp_probe::run(args),
        Command::TcpServer(args) => bench::tcp_server::run(args),
        #[cfg(feature = "smoltcp-bench")]
        Command::SmoltcpServer(args) => bench::smol::run(args),
        Command::Up(a) => {
            return done(
                ctl::client::up(a.config.config.as_deref(), a.netns, a.foreground).map(say),
            )
        }
        Command::Status(a) => {
            return done(ctl::client::status(a.config.config.as_deref()).map(|r| {
                use std::io::Write;
                let text = if a.json {
                    serde_json::to_string_pretty(&r).unwrap_or_default() + "\n"
                } else {
                    r.render()
                };
                // A closed pipe (`| head`) is not an error worth a panic.
                let _ = std::io::stdout().write_all(text.as_bytes());
            }));
        }
        Command::Down(a) => return done(ctl::client::down(a.config.as_deref()).map(say)),
        Command::Kill(a) => {
            return done(
                ctl::client::kill(
                    a.config.config.as_deref(),
                    &a.server,
                    a.signal.as_deref(),
                    a.scribble,
                )
                .map(say),
            )
        }
        Command::Update(a) => {
            let servers: Vec<String> = match (&a.server, a.all) {
                (Some(s), _) => vec![s.clone()],
                (None, _) => config::SERVERS.iter().map(|s| s.to_string()).collect(),
            };
            for server in servers {
                match ctl::client::update(
                    a.config.config.as_deref(),
                    &server,
                    a.binary.as_deref(),
                    a.grace,
                    a.skip_check,
                ) {
                    Ok(r) => {
                        println!("{}", r.line());
                        if r.result != "updated" {
                            return ExitCode::FAILURE;
                        }
                    }
                    Err(e) => {
                        eprintln!("keepnet: error: {server} not updated: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            return ExitCode::SUCCESS;
        }
        Command::Capture(a) => {
            let out = a.out.clone();
            return done(
                ctl::client::capture(a.config.config.as_deref(), &a.out, a.seconds).map(|n| {
                    println!("capture: {n} frames written to {}", out.display());
                }),
            );
        }
        Command::Demo => return done(ctl::demo::run()),
        Command::Daemon(a) => return done(ctl::client::daemon_main(a.config.as_deref(), a.netns)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keepnet: error: {}", error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Prints a command's result line.
fn say(line: String) {
    println!("{line}");
}

/// Exit status of a constellation command; its error messages are complete sentences.
fn done(r: std::result::Result<(), ctl::client::ClientError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keepnet: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout carries results, e.g. `--json`); `RUST_LOG` overrides the level.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
