//! Runs the `persistent_log` example's demo: a real process killed with SIGKILL (twice) restarts
//! from its last snapshot with an intact log holding every append it had confirmed.

use std::process::Command;

#[test]
fn a_killed_process_restarts_from_its_snapshot() {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/examples/persistent_log
    let example = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("examples/persistent_log"))
        .expect("path");
    assert!(
        example.exists(),
        "{} not built (cargo test builds examples)",
        example.display()
    );
    let out = Command::new(&example)
        .arg("demo")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("killed with SIGKILL").count(), 2, "{stdout}");
    assert!(stdout.contains("chain verified"), "{stdout}");
}
