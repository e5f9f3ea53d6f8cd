//! The one skip rule: a test that needs a tool which is not installed
//! prints why it skipped and passes, unless the environment variable `CI`
//! is set (and not empty, "0" or "false"): then the missing tool fails the
//! test, so that a CI image that lost a tool cannot turn suites green.

use std::process::Command;

/// Whether `CI` is set (then a missing tool is a failure).
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

/// Whether a value of `CI` means "in CI".
fn ci_value(v: Option<&str>) -> bool {
    v.is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Applies the rule to `what` (the tests that cannot run), missing because
/// of `why`: panics when `CI` is set, otherwise prints
/// `SKIPPED: what: why` on stderr. The caller then returns.
#[track_caller]
pub fn skip(what: &str, why: &str) {
    skip_in(in_ci(), what, why)
}

#[track_caller]
fn skip_in(ci: bool, what: &str, why: &str) {
    if ci {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_means_set_and_not_false() {
        for v in ["true", "1", "yes", "github"] {
            assert!(ci_value(Some(v)), "{v}");
        }
        for v in [None, Some(""), Some("0"), Some("false")] {
            assert!(!ci_value(v), "{v:?}");
        }
    }

    #[test]
    #[should_panic(expected = "CI is set and the tool tests cannot run: no tool")]
    fn a_missing_tool_fails_in_ci() {
        skip_in(true, "the tool tests", "no tool");
    }

    #[test]
    fn a_missing_tool_skips_outside_ci() {
        skip_in(false, "the tool tests", "no tool");
    }

    #[test]
    fn a_program_on_path_is_found_and_a_made_up_one_is_not() {
        assert!(on_path("sh"));
        assert!(!on_path("microcert-no-such-tool-7f3a"));
    }
}
