//! The user-facing promises of `cordon run` and `cordon policy check`: workspaces, --code,
//! results, exit statuses, and a clear one-line error for every bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::io::Write;
use std::process::Stdio;

#[test]
fn hello_runs_in_a_fresh_throwaway_workspace() {
    let out = run(&[
        "--",
        "python3",
        "-c",
        "import os; print('hello', os.getcwd(), os.listdir('.'))",
    ]);
    assert_eq!(stdout(&out).trim(), "hello /workspace []");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn files_written_to_a_host_workspace_exist_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("work");
    let out = run(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo hi > out.txt",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(ws.join("out.txt")).unwrap(), "hi\n");
    // A second session sees the first one's output and can change it.
    let out = run(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat out.txt; echo more >> out.txt; rm -f gone",
    ]);
    assert_eq!(stdout(&out), "hi\n");
    assert_eq!(
        std::fs::read_to_string(ws.join("out.txt")).unwrap(),
        "hi\nmore\n"
    );
}

#[test]
fn files_deleted_in_the_workspace_are_gone_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("work");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("old.txt"), "x").unwrap();
    let out = run(&["--workspace", ws.to_str().unwrap(), "--", "rm", "old.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!ws.join("old.txt").exists());
}

#[test]
fn relative_workspace_paths_resolve_against_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = cordon()
        .current_dir(dir.path())
        .args([
            "run",
            "--workspace",
            "./rel",
            "--",
            "sh",
            "-c",
            "echo x > f",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("rel/f").exists());
}

#[test]
fn code_runs_from_a_file_with_the_interpreter_guessed_or_given() {
    let dir = tempfile::tempdir().unwrap();
    let snippet = dir.path().join("snippet.py");
    std::fs::write(
        &snippet,
        "import sys\nprint('from snippet', sys.argv[1:])\n",
    )
    .unwrap();
    let (out, result) = run_json(&["--code", snippet.to_str().unwrap(), "--", "a", "b"]);
    assert_eq!(
        stdout(&out).trim(),
        "from snippet ['a', 'b']",
        "{}",
        stderr(&out)
    );
    // sha256 of the file's bytes
    let expected = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(std::fs::read(&snippet).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(result["code_sha256"], expected);
    let txt = dir.path().join("snippet.txt");
    std::fs::write(&txt, "echo from sh\n").unwrap();
    let out = run(&["--code", txt.to_str().unwrap(), "--interpreter", "sh"]);
    assert_eq!(stdout(&out).trim(), "from sh");
}

#[test]
fn code_runs_from_stdin() {
    let mut child = cordon()
        .args(["run", "--code", "-", "--interpreter", "python3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"print(6 * 7)\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out).trim(), "42");
}

#[test]
fn json_prints_one_result_line_on_stderr_after_the_commands_output() {
    let out = run(&["--json", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(stdout(&out), "out\n", "stdout stays the command's");
    let err = stderr(&out);
    let last = err.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["exit_status"], 3);
    assert_eq!(v["exit_code"], 3);
    assert_eq!(
        v["command"],
        serde_json::json!(["sh", "-c", "echo out; echo err >&2; exit 3"])
    );
    assert_eq!(v["session_id"].as_str().unwrap().len(), 26);
    assert!(v["wall_ms"].as_u64().is_some());
    assert!(err.starts_with("err\n"));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn exit_statuses_follow_the_command_and_signals_are_128_plus_n() {
    assert_eq!(run(&["--", "sh", "-c", "exit 7"]).status.code(), Some(7));
    let (out, result) = run_json(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143));
    assert_eq!(result["signal"], 15);
}

#[test]
fn a_missing_command_is_127_and_a_non_executable_one_is_126() {
    let out = run(&["--", "no-such-command-xyz"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("cordon: no-such-command-xyz: command not found"),
        "{}",
        stderr(&out)
    );
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let out = run(&["--workspace", ws.to_str().unwrap(), "--", "./script.sh"]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_command_that_cannot_run_still_gets_a_result_object_with_the_reason() {
    let (out, result) = run_json(&["--", "no-such-command-xyz"]);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(result["exit_status"], 127);
    assert!(result["exit_code"].is_null() && result["signal"].is_null());
    assert!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-command-xyz: command not found")),
        "{result}"
    );
    assert_eq!(result["session_id"].as_str().map(str::len), Some(26));
    // The session ran its layers; the result says which, as for any other run.
    assert_eq!(result["layers"]["network"], "none");
    // A command that ran has no error.
    let (_, ok) = run_json(&["--", "true"]);
    assert!(ok["error"].is_null(), "{ok}");
}

#[test]
fn cordons_own_failure_with_json_prints_an_object_with_status_125_and_the_error() {
    // --json: the object is the last line on stderr, after the one-line message.
    let out = run(&["--json", "--memory", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    let object: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(object["exit_status"], 125);
    assert!(
        object["error"]
            .as_str()
            .is_some_and(|e| e.contains("memory")),
        "{object}"
    );
    assert_eq!(object["command"], serde_json::json!(["true"]));
    assert!(
        err.lines()
            .next()
            .unwrap_or_default()
            .starts_with("cordon: "),
        "{err}"
    );
    // --result FILE: the same object in the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.json");
    let out = run(&[
        "--result",
        file.to_str().unwrap(),
        "--pids",
        "0",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    let object: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(object["exit_status"], 125);
    assert!(object["error"].is_string());
}

/// Runs `cordon ARGS` and returns (status, stderr).
fn error_of(args: &[&str]) -> (i32, String) {
    let out = cordon().args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.code().unwrap(), stderr(&out))
}

#[test]
fn bad_flags_get_a_one_line_error_and_status_125() {
    for (args, needle) in [
        (vec!["run", "--memory", "12X", "--", "true"], "--memory"),
        (vec!["run", "--timeout", "soon", "--", "true"], "--timeout"),
        (vec!["run", "--pids", "0", "--", "true"], "pids"),
        (vec!["run", "--cpu", "-1", "--", "true"], "cpu"),
        (
            vec!["run", "--allow-missing", "everything", "--", "true"],
            "everything",
        ),
        (vec!["run", "--env", "NOEQUALS", "--", "true"], "NOEQUALS"),
        (vec!["run"], "no command given"),
        (
            vec!["run", "--interpreter", "python3", "--", "true"],
            "--interpreter needs --code",
        ),
        (
            vec!["run", "--code", "/nonexistent/x.py"],
            "/nonexistent/x.py",
        ),
        (vec!["run", "--code", "/etc/hostname"], "--interpreter"),
        (
            vec!["run", "--policy", "/nonexistent.toml", "--", "true"],
            "/nonexistent.toml",
        ),
        (vec!["run", "--no-such-flag"], "--no-such-flag"),
        (
            vec!["run", "--syslog", "localhost:514", "--", "true"],
            "--syslog: \"localhost:514\" is not a syslog address",
        ),
        (
            vec!["run", "--syslog-min-severity", "debug", "--", "true"],
            "--syslog-min-severity",
        ),
    ] {
        let (code, err) = error_of(&args);
        assert_eq!(code, 125, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        if args != vec!["run", "--no-such-flag"] {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
            assert!(err.starts_with("cordon: "), "{err}");
        }
    }
}

#[test]
fn policy_errors_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    for (text, needle) in [
        ("[limits]\nmemory = \"12X\"\n", ":2:"),
        ("[sandbox]\ntimout = \"5s\"\n", ":2:"),
        ("[limits]\npids = 0\n", ":2:"),
        ("[network]\nallow = [\"exa mple.com\"]\n", ":2:"),
    ] {
        std::fs::write(&p, text).unwrap();
        let (code, err) = error_of(&["run", "--policy", p.to_str().unwrap(), "--", "true"]);
        assert_eq!(code, 125, "{text}: {err}");
        assert!(
            err.contains(&format!("{}{needle}", p.display())),
            "{text}: {err}"
        );
        let (code, err2) = error_of(&["policy", "check", p.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err2.contains(needle), "{err2}");
    }
}

#[test]
fn policy_check_prints_the_effective_policy_and_flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        "[limits]\nmemory = \"256M\"\npids = 32\n[sandbox]\ntimeout = \"10s\"\n",
    )
    .unwrap();
    let out = cordon()
        .args(["policy", "check", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("memory = \"256M\""), "{text}");
    assert!(text.contains("pids = 32"), "{text}");
    // The printed policy is itself a valid policy.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &text).unwrap();
    let out2 = cordon()
        .args(["policy", "check", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(stdout(&out2), text);
    // Flags override the file.
    let out = run(&[
        "--policy",
        p.to_str().unwrap(),
        "--pids",
        "48",
        "--",
        "cat",
        "/sys/fs/cgroup/pids.max",
    ]);
    let _ = out; // the cgroup file layout inside differs between v1 and v2; checked via the limits tests
}

#[test]
fn extra_binds_are_read_only_unless_marked_writable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(data.join("in.txt"), "input").unwrap();
    if is_root() {
        // The sandbox writes as its own host uid.
        std::os::unix::fs::chown(&out_dir, Some(1900000), Some(1900000)).unwrap();
    }
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        format!(
            "[[sandbox.mounts]]\nhost = \"{}\"\npath = \"/data\"\n[[sandbox.mounts]]\nhost = \"{}\"\npath = \"/out\"\nwritable = true\n",
            data.display(),
            out_dir.display()
        ),
    )
    .unwrap();
    let out = run(&[
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat /data/in.txt; echo x > /data/new 2>/dev/null || echo READONLY; echo y > /out/new && echo WROTE",
    ]);
    assert_eq!(stdout(&out), "inputREADONLY\nWROTE\n", "{}", stderr(&out));
    assert!(out_dir.join("new").exists());
}

#[test]
fn doctor_prints_every_layer_and_its_self_test_passes() {
    let out = cordon()
        .arg("doctor")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    for layer in [
        "user namespaces",
        "landlock",
        "seccomp",
        "cgroups",
        "cgroup attach",
        "workspace cap",
        "self-test",
    ] {
        assert!(text.contains(layer), "{layer} missing from:\n{text}");
    }
    if is_root() {
        assert!(out.status.success(), "{text}{}", stderr(&out));
        assert!(
            text.contains("no network, host canary unreadable, pids limit bites"),
            "{text}"
        );
    } else {
        // Without root there are no cgroups here: doctor must say so and fail.
        assert!(text.contains("MISSING"), "{text}");
        assert!(!out.status.success());
    }
}

#[test]
fn a_session_is_forwarded_live_to_a_syslog_receiver_over_udp() {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.db");
    let url = format!("udp://{}", receiver.local_addr().unwrap());
    let (out, result) = run_json(&[
        "--audit",
        audit.to_str().unwrap(),
        "--syslog",
        &url,
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let session = result["session_id"].as_str().unwrap();
    let mut buf = vec![0u8; 65536];
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let n = receiver.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("<110>1 "), "{text}");
        assert!(
            text.contains(&format!("[cordon@32473 session=\"{session}\"")),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&text[text.find("] {").unwrap() + 2..]).unwrap();
        assert_eq!(json["session_id"], session);
        kinds.push(json["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds, ["session_start", "session_end"]);
    assert!(!stderr(&out).contains("syslog"), "{}", stderr(&out));
}

#[test]
fn credential_set_up_errors_name_the_credential_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!("[network]\nallow = [\"api.github.com\"]\n{body}[[credentials]]\nname = \"gh\"\nhosts = [\"api.github.com\"]\nheader = \"Authorization\"\n"),
        )
        .unwrap();
        p.display().to_string()
    };
    let missing_file = policy("f.toml", "") + "";
    std::fs::write(
        &missing_file,
        std::fs::read_to_string(&missing_file).unwrap()
            + "from_file = \"/nonexistent/cordon-secret\"\nenv = \"GH\"\n",
    )
    .unwrap();
    let failing_cmd = policy("c.toml", "");
    std::fs::write(
        &failing_cmd,
        std::fs::read_to_string(&failing_cmd).unwrap()
            + "from_command = [\"/bin/false\"]\nenv = \"GH\"\n",
    )
    .unwrap();
    let no_network = policy("n.toml", "");
    std::fs::write(
        &no_network,
        format!(
            "[sandbox]\nnetwork = \"none\"\n{}from_env = \"HOME\"\nenv = \"GH\"\n",
            std::fs::read_to_string(&no_network).unwrap()
        ),
    )
    .unwrap();
    let unset_env = policy("e.toml", "");
    std::fs::write(
        &unset_env,
        std::fs::read_to_string(&unset_env).unwrap()
            + "from_env = \"CORDON_TEST_SURELY_UNSET_SECRET\"\n",
    )
    .unwrap();
    let bad_ca = dir.path().join("not-a-ca.pem");
    std::fs::write(&bad_ca, "not PEM\n").unwrap();
    let with_secret = policy("s.toml", "");
    std::fs::write(
        &with_secret,
        std::fs::read_to_string(&with_secret).unwrap()
            + "from_command = [\"/bin/echo\", \"a-long-enough-secret\"]\nenv = \"GH\"\n",
    )
    .unwrap();
    let bad_ca = bad_ca.display().to_string();
    for (args, needle) in [
        (
            vec!["run", "--policy", &missing_file, "--", "true"],
            "credential gh: cannot read /nonexistent/cordon-secret",
        ),
        (
            vec!["run", "--policy", &failing_cmd, "--", "true"],
            "credential gh: /bin/false failed",
        ),
        (
            vec!["run", "--policy", &unset_env, "--", "true"],
            "credential gh: environment variable CORDON_TEST_SURELY_UNSET_SECRET is not set",
        ),
        (
            vec!["run", "--policy", &no_network, "--", "true"],
            "need the gateway, but sandbox.network is \"none\"",
        ),
        (
            vec![
                "run",
                "--policy",
                &with_secret,
                "--upstream-ca",
                &bad_ca,
                "--",
                "true",
            ],
            "no PEM certificate in it",
        ),
    ] {
        let (status, err) = error_of(&args);
        assert_eq!(status, 125, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("a-long-enough-secret"), "{err}");
    }
}
