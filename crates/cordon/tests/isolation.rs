//! Each boundary of `cordon run`, attacked from inside a real sandbox. Every test also runs the
//! same attack without the sandbox and shows it succeeding there, so the test fails if the
//! boundary is gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::io::Read;
use std::net::TcpListener;

#[test]
fn connecting_to_a_listener_on_the_host_loopback_fails_inside_the_sandbox() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket\ntry:\n  socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')\nexcept OSError as e:\n  print('REFUSED', e.errno)"
    );
    let out = bare(&format!("{PY} -c \"{script}\""));
    assert_eq!(
        stdout(&out).trim(),
        "CONNECTED",
        "control: the host listener is reachable"
    );
    let out = run(&["--", "python3", "-c", &script]);
    assert!(
        stdout(&out).starts_with("REFUSED"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn any_connect_outside_the_sandbox_fails_at_once_with_network_mode_none() {
    // The sandbox's own network namespace has only lo: nothing can leave it.
    let out = run(&[
        "--",
        "python3",
        "-c",
        "import socket,errno\ntry:\n  socket.create_connection(('192.0.2.1', 80), timeout=5)\nexcept OSError as e:\n  print(errno.errorcode[e.errno])",
    ]);
    // Landlock refuses the TCP connect (EACCES) before routing would (ENETUNREACH).
    let got = stdout(&out).trim().to_string();
    assert!(
        got == "EACCES" || got == "ENETUNREACH",
        "{got} {}",
        stderr(&out)
    );
    let out = run(&["--", "cat", "/proc/net/dev"]);
    let ifaces: Vec<String> = stdout(&out)
        .lines()
        .skip(2)
        .map(|l| l.split(':').next().unwrap().trim().to_string())
        .collect();
    assert_eq!(ifaces, vec!["lo"]);
}

#[test]
fn reading_a_host_canary_file_and_etc_shadow_fails_inside_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let (path, secret) = canary(dir.path());
    let script = format!("cat {} /etc/shadow 2>&1", path.display());
    let out = bare(&script);
    assert!(
        stdout(&out).contains(&secret),
        "control: the canary is readable"
    );
    if is_root() {
        assert!(
            stdout(&out).contains("root:"),
            "control: root reads /etc/shadow"
        );
    }
    let out = run(&["--", "sh", "-c", &script]);
    assert!(!stdout(&out).contains(&secret));
    assert!(stdout(&out).contains("No such file"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("root:"));
}

#[test]
fn the_sandbox_sees_no_host_home_root_sys_or_run() {
    let out = run(&[
        "--",
        "sh",
        "-c",
        "ls -d /home /root /sys /run /boot /var 2>&1; ls /",
    ]);
    let text = stdout(&out);
    for p in ["/home", "/root", "/sys", "/run", "/boot", "/var"] {
        assert!(
            text.contains(&format!("ls: cannot access '{p}'")),
            "{p} visible: {text}"
        );
    }
}

#[test]
fn writing_outside_the_workspace_fails_and_the_root_is_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("written-by-sandbox");
    let script = format!(
        "for f in /usr/x /etc/x /x /proc/sys/kernel/hostname {}; do echo 1 > $f 2>/dev/null && echo WROTE $f; done; echo done",
        target.display()
    );
    let out = bare(&format!("echo 1 > {} && echo WROTE", target.display()));
    assert!(
        stdout(&out).contains("WROTE"),
        "control: the host path is writable"
    );
    std::fs::remove_file(&target).unwrap();
    let out = run(&["--", "sh", "-c", &script]);
    assert_eq!(stdout(&out).trim(), "done", "{}", stdout(&out));
    assert!(!target.exists());
}

#[test]
fn the_curated_etc_files_are_the_hosts_and_cannot_be_changed() {
    // Small /etc files are copied into the read-only root instead of bound: same contents,
    // and neither writable, nor re-permissionable, nor replaceable by the sandbox user.
    let names = ["ld.so.cache", "services", "profile"];
    let present: Vec<&str> = names
        .into_iter()
        .filter(|n| std::path::Path::new("/etc").join(n).is_file())
        .collect();
    assert!(!present.is_empty(), "none of {names:?} on this host");
    let script = present
        .iter()
        .map(|n| {
            format!(
                "cksum < /etc/{n}; echo x >> /etc/{n} 2>/dev/null && echo WROTE; \
                 chmod 666 /etc/{n} 2>/dev/null && echo CHMOD; \
                 mv /etc/{n} /tmp/ 2>/dev/null && echo MOVED"
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let out = run(&["--", "sh", "-c", &script]);
    let host = present
        .iter()
        .map(|n| stdout(&bare(&format!("cksum < /etc/{n}"))))
        .collect::<String>();
    assert_eq!(stdout(&out), host, "{}", stderr(&out));
}

#[test]
fn symlinks_and_dotdot_in_the_workspace_cannot_lead_out_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let (secret_path, secret) = canary(dir.path());
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::symlink(&secret_path, ws.join("link")).unwrap();
    std::os::unix::fs::symlink("../host-secret.txt", ws.join("rel")).unwrap();
    // Control: on the host both links lead to the secret.
    let out = bare(&format!("cat {0}/link {0}/rel", ws.display()));
    assert_eq!(stdout(&out), format!("{secret}{secret}"));
    let out = run(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat link rel ../host-secret.txt /workspace/../../host-secret.txt 2>&1; ln -s /etc/shadow s2; cat s2 2>&1",
    ]);
    assert!(!stdout(&out).contains(&secret), "{}", stdout(&out));
}

#[test]
fn hardlinks_to_files_outside_the_workspace_cannot_be_made() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    // Control: on the host, a hardlink of a file outside the workspace into it works when both
    // are on one filesystem.
    let (secret_path, _) = canary(dir.path());
    let out = bare(&format!(
        "ln {} {}/hl && echo LINKED",
        secret_path.display(),
        ws.display()
    ));
    assert!(stdout(&out).contains("LINKED"));
    std::fs::remove_file(ws.join("hl")).unwrap();
    let out = run(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "ln /etc/passwd hl 2>&1 || echo FAILED; ln /usr/bin/true hl2 2>&1 || echo FAILED",
    ]);
    assert_eq!(
        stdout(&out).matches("FAILED").count(),
        2,
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_host_secret_variable_never_reaches_the_sandbox() {
    let out = cordon()
        .args(["run", "--", "env"])
        .env("AWS_SECRET_ACCESS_KEY", "s3cr3t-from-host")
        .env("LANG", "C.UTF-8")
        .output()
        .unwrap();
    let env = stdout(&out);
    assert!(!env.contains("s3cr3t-from-host"));
    assert!(env.contains("HOME=/workspace"));
    assert!(env.contains("LANG=C.UTF-8"), "LANG passes through: {env}");
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    for n in &names {
        assert!(
            ["PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "TZ", "PWD", "SHLVL", "_"]
                .contains(n),
            "unexpected variable {n}"
        );
    }
    // Control: without the sandbox the variable is there.
    let out = std::process::Command::new("env")
        .env("AWS_SECRET_ACCESS_KEY", "s3cr3t-from-host")
        .output()
        .unwrap();
    assert!(stdout(&out).contains("s3cr3t-from-host"));
}

#[test]
fn policy_env_is_added_but_cannot_move_home() {
    let out = run(&["--env", "FOO=bar", "--", "sh", "-c", "echo $FOO $HOME"]);
    assert_eq!(stdout(&out).trim(), "bar /workspace");
    let out = run(&["--env", "HOME=/etc", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("HOME"), "{}", stderr(&out));
}

#[test]
fn every_descriptor_but_stdin_stdout_stderr_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = canary(dir.path());
    let file = std::fs::File::open(&path).unwrap();
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // Make the descriptor inheritable, as a careless caller would.
    // SAFETY: clearing FD_CLOEXEC on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let out = run(&[
        "--",
        "sh",
        "-c",
        "ls /proc/self/fd | sort -n | tr '\\n' ' '",
    ]);
    // ls has its own directory fd open (3) while listing: only 0 1 2 and that one.
    assert_eq!(stdout(&out).trim(), "0 1 2 3", "{}", stderr(&out));
    let out = run(&["--", "sh", "-c", &format!("cat <&{fd} 2>&1 || echo CLOSED")]);
    assert!(stdout(&out).contains("CLOSED"), "{}", stdout(&out));
    drop(file);
}

#[test]
fn the_sandbox_user_is_unprivileged_and_maps_to_an_unprivileged_host_uid() {
    let out = run(&["--", "sh", "-c", "id -u; id -g; cat /proc/self/uid_map; grep Cap /proc/self/status; grep NoNewPrivs /proc/self/status"]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    let map: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(map[0], "1000");
    assert_ne!(map[1], "0", "sandbox uid maps to host root");
    assert_eq!(map[2], "1", "exactly one id is mapped");
    if is_root() {
        assert_eq!(map[1], "1900000");
    }
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = lines.iter().find(|l| l.starts_with(cap)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    assert!(text.contains("NoNewPrivs:\t1"));
}

#[test]
fn pid_one_is_cordons_init_and_the_host_processes_are_invisible() {
    let out = run(&[
        "--",
        "sh",
        "-c",
        "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; echo $$",
    ]);
    let text = stdout(&out);
    let pids: Vec<u32> = text
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids[0], 1);
    // init, sh, and the four processes of the pipeline.
    assert!(pids.len() <= 6, "only the sandbox's processes: {pids:?}");
    assert_eq!(text.lines().nth(1).unwrap(), "2", "the command is pid 2");
}

#[test]
fn pid_one_shows_its_own_name_not_the_supervisors_command_line() {
    // The supervisor's command line holds host paths and flags; the init is its clone.
    let marker = format!("marker-{}", rand_u32());
    let out = run(&[
        "--env",
        &format!("X={marker}"),
        "--",
        "sh",
        "-c",
        "tr '\\0' ' ' </proc/1/cmdline; echo; cat /proc/1/comm",
    ]);
    let text = stdout(&out);
    let mut lines = text.lines();
    let cmdline = lines.next().unwrap_or_default();
    assert_eq!(cmdline.trim(), "cordon-init", "{text}");
    assert!(!text.contains(&marker) && !text.contains("--env"), "{text}");
    assert_eq!(lines.next(), Some("cordon-init"));
}

#[test]
fn dangerous_proc_files_are_masked() {
    let out = run(&["--", "sh", "-c", "wc -c < /proc/kcore; cat /proc/keys | wc -c; ls /proc/acpi 2>&1 | wc -l; echo x > /proc/sysrq-trigger 2>&1 && echo WROTE"]);
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines[0].trim(), "0", "kcore is empty");
    assert_eq!(lines[1].trim(), "0", "keys is empty");
    assert!(!stdout(&out).contains("WROTE") || lines.len() >= 3);
}

#[test]
fn there_is_no_controlling_terminal_and_tiocsti_is_refused() {
    // Run cordon under a real pseudo-terminal; the sandboxed code tries to push a command into
    // the caller's terminal input with TIOCSTI.
    let probe = "import fcntl, termios, sys\ntry:\n  fcntl.ioctl(0, termios.TIOCSTI, b'x'); print('INJECTED')\nexcept OSError as e:\n  print('REFUSED', e.errno)";
    let driver = r#"
import os, pty, sys, select
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b''
while True:
    try:
        r, _, _ = select.select([fd], [], [], 10)
        if not r: break
        data = os.read(fd, 4096)
        if not data: break
        out += data
    except OSError:
        break
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors='replace'))
"#;
    let bare_out = std::process::Command::new(PY)
        .args(["-c", driver, PY, "-c", probe])
        .output()
        .unwrap();
    let cordon_bin = env!("CARGO_BIN_EXE_cordon");
    let out = std::process::Command::new(PY)
        .args([
            "-c", driver, cordon_bin, "run", "--", "python3", "-c", probe,
        ])
        .output()
        .unwrap();
    if is_root()
        && std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    {
        assert!(
            stdout(&bare_out).contains("INJECTED"),
            "control: {}",
            stdout(&bare_out)
        );
    }
    assert!(stdout(&out).contains("REFUSED"), "{}", stdout(&out));
}

#[test]
fn the_result_records_every_layer_applied() {
    let (out, result) = run_json(&["--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let layers = &result["layers"];
    assert_eq!(
        layers["landlock_abi"].as_u64().unwrap(),
        landlock_abi() as u64
    );
    assert_eq!(layers["landlock_enforced"], true);
    assert!(layers["seccomp"]["rules"].as_u64().unwrap() > 30);
    assert_eq!(layers["no_new_privs"], true);
    assert_eq!(layers["network"], "none");
    assert_eq!(layers["lowered"].as_array().unwrap().len(), 0);
    for ns in ["user", "pid", "mount", "network", "ipc", "uts", "cgroup"] {
        assert!(layers["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == ns));
    }
    if is_root() {
        assert!(layers["cgroup"].is_string());
    }
}

fn landlock_abi() -> i64 {
    // SAFETY: the documented version query: null attr, size 0, flag VERSION.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    }
}

#[test]
fn a_second_sandbox_cannot_see_the_first_ones_files_or_processes() {
    let mut first = cordon()
        .args(["run", "--", "sh", "-c", "echo marker-a1 > /tmp/a; sleep 3"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = run(&["--", "sh", "-c", "cat /tmp/a 2>&1; ps -e | wc -l"]);
    assert!(!stdout(&out).contains("marker-a1"));
    let mut s = String::new();
    first.wait().unwrap();
    first.stdout.take().unwrap().read_to_string(&mut s).unwrap();
}
