//! The one skip rule: a test that needs a tool which is not installed
//! prints why it skipped and passes, unless the environment variable `CI`
//! is set (and not empty, "0" or "false"): then the missing tool fails the
//! test, so that a CI image that lost a tool cannot turn suites green.

use std::process::Command;

/// Whether `CI` is set (then a missing tool is a failure).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Applies the rule to `what` (the tests that cannot run), missing because
/// of `why`: panics when `CI` is set, otherwise prints
/// `SKIPPED: what: why` on stderr. The caller then returns.
#[track_caller]
pub fn skip(what: &str, why: &str) {
    if in_ci() {
        panic!("CI is set and {what} cannot run: {why}");
    }
    eprintln!("SKIPPED: {what}: {why} (with CI=true this is a failure)");
}

/// `Some(value)`, or `None` after [`skip`] when `found` is an error.
#[track_caller]
pub fn require<T>(what: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(why) => {
            skip(what, &why);
            None
        }
    }
}

/// Whether a program is on PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v '{program}'")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `program` is on PATH; when it is not, applies [`skip`] with
/// `hint` (how to install it) and returns false.
#[track_caller]
pub fn require_tool(program: &str, hint: &str) -> bool {
    if on_path(program) {
        return true;
    }
    skip(
        &format!("tests needing {program}"),
        &format!("{program} is not installed ({hint})"),
    );
    false
}
