//! The configuration file: `haven serve --config haven.toml`.
//!
//! A flat TOML table whose keys are the long names of `serve`'s flags
//! (`message-rate = 20`, `allowed-origin = ["https://chat.example.org"]`).
//! A key becomes that flag, given only when neither the command line nor
//! the flag's environment variable set it: flags > environment > file >
//! defaults. Because each key goes through the same parser as its flag, the
//! file accepts exactly what the command line does, and the keys, their
//! help and their defaults come from [`crate::config`], never a second list.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::Path;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};
use serde_json::Value;

use crate::config::Cli;

/// The command line, completed by the configuration file if one is named
/// (`--config` or `HAVEN_CONFIG`). On `--help`, `--version` or a bad flag
/// it exits as clap does; on a bad file it prints every problem and exits
/// with status 2.
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    let matches = resolve(&args).unwrap_or_else(|problems| refuse(&problems)).matches;
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// Prints every problem of the configuration and exits with status 2, as
/// clap does for a bad flag.
fn refuse(problems: &[String]) -> ! {
    for problem in problems {
        eprintln!("error: {problem}");
    }
    std::process::exit(2);
}

/// `haven config check`: resolves `serve`'s configuration as
/// `haven serve --config FILE` would (the environment included, flags
/// aside) and prints
/// it, secrets masked, each value with where it came from. Every unknown
/// key and invalid value is named, and makes it exit with status 2.
pub fn check(config: Option<&Path>) -> anyhow::Result<()> {
    let mut args: Vec<OsString> = vec!["haven".into(), "serve".into()];
    if let Some(config) = config {
        args.extend(["--config".into(), config.into()]);
    }
    let resolved = resolve(&args).unwrap_or_else(|problems| refuse(&problems));
    let serve = resolved.matches.subcommand_matches("serve").expect("serve was given");
    let mut out = String::new();
    for arg in &settings() {
        let id = arg.get_id().as_str();
        let key = arg.get_long().expect("settings have long names");
        let values: Vec<&OsStr> = serve.get_raw(id).map(Iterator::collect).unwrap_or_default();
        let source = match serve.value_source(id) {
            _ if resolved.from_file.contains(id) => "file".to_owned(),
            Some(ValueSource::CommandLine) => "flag".to_owned(),
            Some(ValueSource::EnvVariable) => {
                format!("environment {}", arg.get_env().unwrap_or_default().to_string_lossy())
            }
            Some(ValueSource::DefaultValue) => "default".to_owned(),
            _ => "not set".to_owned(),
        };
        if values.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue) {
            out.push_str(&format!("# {key} is not set\n"));
            continue;
        }
        let shown = if is_secret(arg) {
            "\"********\"".to_owned()
        } else if matches!(arg.get_action(), ArgAction::SetTrue) {
            serve.get_flag(id).to_string()
        } else {
            let values: Vec<String> = values.iter().map(|value| mask_url(&value.to_string_lossy())).collect();
            toml_value(arg, &values)
        };
        out.push_str(&format!("{key} = {shown}  # {source}\n"));
    }
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    Ok(())
}

/// `haven config example`: a commented file with every key at its default.
pub fn example() -> String {
    let mut out = String::from(
        "# Haven's configuration: `haven serve --config haven.toml`.\n\
         # Each key is a flag of `haven serve` without its dashes. A flag on the\n\
         # command line, or its environment variable, overrides the key; a key\n\
         # overrides the default. Every key is shown commented out, at its default.\n",
    );
    for arg in &settings() {
        let key = arg.get_long().expect("settings have long names");
        out.push('\n');
        let mut help = arg.get_long_help().or(arg.get_help()).map(ToString::to_string).unwrap_or_default();
        if !help.ends_with('.') {
            help.push('.');
        }
        for line in wrap(&help, 74) {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        let choices: Vec<String> =
            arg.get_possible_values().iter().map(|value| value.get_name().to_owned()).collect();
        if !choices.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue) {
            out.push_str(&format!("# One of: {}.\n", choices.join(", ")));
        }
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# Environment: {}\n", env.to_string_lossy()));
        }
        let defaults: Vec<String> =
            arg.get_default_values().iter().map(|value| value.to_string_lossy().into_owned()).collect();
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            out.push_str(&format!("# {key} = false\n"));
        } else if matches!(arg.get_action(), ArgAction::Append) {
            out.push_str(&format!("# {key} = []\n"));
        } else if defaults.is_empty() {
            out.push_str(&format!("# {key} = …  (not set by default)\n"));
        } else {
            out.push_str(&format!("# {key} = {}\n", toml_value(arg, &defaults)));
        }
    }
    out
}

/// The command line's matches with the file's keys applied, and which
/// settings the file gave.
struct Resolved {
    matches: ArgMatches,
    from_file: BTreeSet<String>,
}

fn resolve(args: &[OsString]) -> Result<Resolved, Vec<String>> {
    let command = Cli::command();
    let first = command.clone().get_matches_from(args);
    // `haven config check` reads the file as `serve` would, by itself.
    let path =
        first.get_one::<std::path::PathBuf>("config").filter(|_| first.subcommand_name() != Some("config"));
    let Some(path) = path else {
        return Ok(Resolved { matches: first, from_file: BTreeSet::new() });
    };
    let file = read(path).map_err(|problem| vec![problem])?;
    let leaf = leaf_matches(&first);
    let applicable = leaf_arguments(&first);
    let known: BTreeMap<String, Arg> =
        settings().into_iter().map(|arg| (arg.get_long().expect("long").to_owned(), arg)).collect();

    let mut problems = Vec::new();
    let mut extra: Vec<OsString> = Vec::new();
    let mut from_file = BTreeSet::new();
    let shown = path.display();
    for (key, value) in &file {
        let Some(arg) = known.get(key) else {
            problems.push(format!("{shown}: unknown key `{key}` (`haven config example` lists every key)"));
            continue;
        };
        let id = arg.get_id().as_str();
        // A key of `serve` that this command does not take (`bind` for
        // `haven therapist add`) is not for it.
        if !applicable.contains(id) {
            continue;
        }
        if matches!(leaf.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let flags = match as_flags(arg, value) {
            Ok(flags) => flags,
            Err(problem) => {
                problems.push(format!("{shown}: `{key}`: {problem}"));
                continue;
            }
        };
        // Each key alone through clap, so that every bad value is named.
        let alone = command.clone().try_get_matches_from(args.iter().cloned().chain(flags.iter().cloned()));
        if let Err(error) = alone {
            problems.push(format!("{shown}: `{key}`: {}", first_line(&error)));
            continue;
        }
        from_file.insert(id.to_owned());
        extra.extend(flags);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    command
        .try_get_matches_from(args.iter().cloned().chain(extra))
        .map(|matches| Resolved { matches, from_file })
        .map_err(|error| vec![format!("{shown}: {}", first_line(&error))])
}

/// The file's table, or why it cannot be read.
fn read(path: &Path) -> Result<BTreeMap<String, Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    basic_toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))
}

/// Every setting a file may hold: `serve`'s flags and the global ones, in
/// the order `--help` shows them, but not `--config` itself.
fn settings() -> Vec<Arg> {
    let mut command = Cli::command();
    command.build();
    let serve = command.find_subcommand("serve").expect("serve");
    serve
        .get_arguments()
        .filter(|arg| {
            arg.get_long().is_some_and(|long| long != "config")
                && !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version)
        })
        .cloned()
        .collect()
}

/// The matches of the subcommand that runs (`add` in `haven therapist add`).
fn leaf_matches(matches: &ArgMatches) -> &ArgMatches {
    match matches.subcommand() {
        Some((_, sub)) => leaf_matches(sub),
        None => matches,
    }
}

/// The ids of the arguments the running subcommand takes.
fn leaf_arguments(matches: &ArgMatches) -> BTreeSet<String> {
    let mut command = Cli::command();
    command.build();
    let mut current = &command;
    let mut level = matches;
    while let Some((name, sub)) = level.subcommand() {
        current = current.find_subcommand(name).expect("a parsed subcommand exists");
        level = sub;
    }
    current.get_arguments().map(|arg| arg.get_id().as_str().to_owned()).collect()
}

/// The command-line words that give `arg` the file's `value`.
fn as_flags(arg: &Arg, value: &Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().expect("long");
    let scalar = |value: &Value| match value {
        Value::String(text) => Ok(text.clone()),
        Value::Number(number) => Ok(number.to_string()),
        Value::Bool(flag) => Ok(flag.to_string()),
        _ => Err("expected a string, a number or true/false".to_owned()),
    };
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, Value::Bool(true)) => Ok(vec![format!("--{long}").into()]),
        (ArgAction::SetTrue, Value::Bool(false)) => Ok(Vec::new()),
        (ArgAction::SetTrue, _) => Err("expected true or false".to_owned()),
        (ArgAction::Append, Value::Array(items)) => {
            items.iter().map(|item| scalar(item).map(|text| format!("--{long}={text}").into())).collect()
        }
        (_, Value::Array(_)) => Err("expected one value, not a list".to_owned()),
        (_, value) => Ok(vec![format!("--{long}={}", scalar(value)?).into()]),
    }
}

/// `values` as TOML: a list for a repeatable flag, bare numbers and
/// booleans, strings quoted.
fn toml_value(arg: &Arg, values: &[String]) -> String {
    let one = |value: &String| {
        if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
            value.clone()
        } else {
            Value::String(value.clone()).to_string()
        }
    };
    match arg.get_action() {
        ArgAction::Append => format!("[{}]", values.iter().map(one).collect::<Vec<_>>().join(", ")),
        _ => values.first().map(one).unwrap_or_default(),
    }
}

fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set()
}

/// A URL with its password (`postgres://user:secret@host/db`) masked.
fn mask_url(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else { return value.to_owned() };
    let Some((user_info, host)) = rest.split_once('@') else { return value.to_owned() };
    match user_info.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:********@{host}"),
        None => value.to_owned(),
    }
}

fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// `text`'s paragraphs, each broken into lines of at most `width`
/// characters, with an empty line between paragraphs.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for (index, paragraph) in text.split("\n\n").enumerate() {
        if index > 0 {
            lines.push(String::new());
        }
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_database_url_is_masked() {
        assert_eq!(
            mask_url("postgres://haven:s3cret@db:5432/haven"),
            "postgres://haven:********@db:5432/haven"
        );
        assert_eq!(mask_url("postgres://haven@db/haven"), "postgres://haven@db/haven");
        assert_eq!(mask_url("sqlite://haven.db"), "sqlite://haven.db");
    }

    #[test]
    fn help_is_wrapped_by_paragraph() {
        assert_eq!(wrap("one two three\n\nfour", 7), ["one two", "three", "", "four"]);
    }
}
