//! `sandscope rules test`: offline replay of a log through rules.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sandscope"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn rules_test_prints_matches_values_and_transitions() {
    let d = tempfile::tempdir().unwrap();
    let rules = d.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rules]]
name = "errors"
terms = '"ERROR" -"retry"'
default_value = 0
[rules.alarm]
threshold = 3
window_s = 1
datapoints = 2
of = 3
[[rules]]
name = "mem"
pattern = 'Max Memory Used: (?P<mb>\d+) MB'
value = "mb"
unit = "Megabytes"
source = "platform"
"#,
    )
    .unwrap();
    let mut log = String::new();
    for i in 0..40 {
        // 10 lines/s: seconds 1-2 are error-heavy, the rest quiet.
        log.push_str(if (10..30).contains(&i) {
            "ERROR boom\n"
        } else {
            "INFO fine\n"
        });
    }
    log.push_str("platform: REPORT RequestId: x\tMax Memory Used: 77 MB\n");
    log.push_str("ERROR will retry\n");
    let lp = d.path().join("sample.log");
    std::fs::write(&lp, log).unwrap();
    let (code, out, err) = run(&[
        "rules",
        "test",
        rules.to_str().unwrap(),
        "--log",
        lp.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rule errors") && out.contains("20 matches"),
        "{out}"
    );
    assert!(out.contains("INSUFFICIENT_DATA -> OK"), "{out}");
    assert!(out.contains("OK -> ALARM"), "{out}");
    assert!(out.contains("ALARM -> OK"), "{out}");
    assert!(out.contains("values (Megabytes): 77"), "{out}");
}

#[test]
fn rules_test_bad_rules_exit_1_with_the_error() {
    let d = tempfile::tempdir().unwrap();
    let rules = d.path().join("bad.toml");
    std::fs::write(&rules, "[[rules]]\nname = 'e'\npattern = 'ERROR ('\n").unwrap();
    let lp = d.path().join("x.log");
    std::fs::write(&lp, "x\n").unwrap();
    let (code, _, err) = run(&[
        "rules",
        "test",
        rules.to_str().unwrap(),
        "--log",
        lp.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rules[0].pattern") && err.contains("column 7"),
        "{err}"
    );
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn example_rules_replay() {
    let ex = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rules.toml");
    let d = tempfile::tempdir().unwrap();
    let lp = d.path().join("x.log");
    std::fs::write(
        &lp,
        "platform: Task timed out after 3.00 seconds\nstderr: ERROR x\n",
    )
    .unwrap();
    let (code, out, err) = run(&["rules", "test", ex, "--log", lp.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rule timeouts"), "{out}");
}
