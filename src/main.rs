use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    haven::run(haven::config::Cli::parse()).await
}
