//! Real Firecracker VMs for the end-to-end tests: finding the binary (and Firecracker's example
//! uffd handler, which benchmarks run as a baseline), a tiny guest built with the system `cc`,
//! and a snapshot of it made once per test process (the fixture).
//!
//! ```text
//! guest (freestanding, 64-bit, CPL0, loaded at 2 MiB):
//!   fill 8 MiB at 16 MiB with 0x5a17c0de5a17c0de ─▶ "READY\n" on COM1
//!   loop: check the 8 MiB (repe scasq) ─▶ "OK\n" | "BAD\n" and halt
//! fixture: boot it (32 MiB, 1 vCPU) ─▶ first "OK" ─▶ pause ─▶ full snapshot (vmstate + memory)
//! ```
//!
//! COM1 is Firecracker's stdout, so each clone's console log shows its checks; every `OK` in a
//! clone's log is a pass over memory that came back from pagerd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use vmm_glue::http;

/// Guest memory, in MiB.
pub const GUEST_MIB: u64 = 32;

/// The guest's program: fills and checks 8 MiB at 16 MiB, reporting on COM1 (port 0x3f8).
const GUEST_ASM: &str = r#"
    .code64
    .globl _start
    .text
_start:
    mov $0x1000000, %rdi
    mov $0x100000, %rcx
    movabs $0x5a17c0de5a17c0de, %rax
    cld
    rep stosq
    lea ready(%rip), %rsi
    call puts
1:
    mov $0x1000000, %rdi
    mov $0x100000, %rcx
    movabs $0x5a17c0de5a17c0de, %rax
    repe scasq
    jne 2f
    lea ok(%rip), %rsi
    call puts
    jmp 1b
2:
    lea bad(%rip), %rsi
    call puts
3:  hlt
    jmp 3b
puts:
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp 4b
5:  ret
    .section .rodata
ready: .asciz "READY\n"
ok: .asciz "OK\n"
bad: .asciz "BAD\n"
"#;

/// `name` from the Firecracker release the test machines provide beside the workspace
/// (`../shared/vendor/firecracker/`), if it is there.
fn vendored(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vendor/firecracker")
        .join(name);
    path.is_file().then_some(path)
}

/// The Firecracker binary: `$FIRECRACKER`, `firecracker` on `PATH`, or the vendored one
/// beside the workspace (`../shared/vendor/firecracker/`); `Err` says why there is none.
pub fn binary() -> Result<PathBuf, String> {
    if let Ok(path) = vmm_glue::find_binary(&vmm_glue::firecracker::BINARY, None) {
        return Ok(path);
    }
    vendored("firecracker").ok_or_else(|| {
        "no firecracker binary ($FIRECRACKER, PATH, ../shared/vendor/firecracker)".into()
    })
}

/// Firecracker's jailer and a Firecracker that runs inside its chroot (statically linked):
/// `$JAILER` and `$JAILED_FIRECRACKER` if set, else the vendored pair beside the workspace
/// (`../shared/vendor/firecracker/`); `Err` says why there are none.
pub fn jailer() -> Result<(PathBuf, PathBuf), String> {
    let pick = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .or_else(|| vendored(name))
            .ok_or_else(|| format!("no {name} (${var}, ../shared/vendor/firecracker)"))
    };
    Ok((
        pick("JAILER", "jailer")?,
        pick("JAILED_FIRECRACKER", "firecracker")?,
    ))
}

/// Firecracker's example page server `uffd_on_demand_handler` (`uffd_on_demand_handler
/// SOCKET MEMFILE`: one VMM's handoff, one 4 KiB `UFFDIO_COPY` per fault): `$FC_UFFD_HANDLER`
/// if set (and then only that), else the vendored one beside the workspace
/// (`../shared/vendor/firecracker/`), else `uffd_on_demand_handler` on `PATH`; `Err` says why
/// there is none.
pub fn uffd_handler() -> Result<PathBuf, String> {
    const NAME: &str = "uffd_on_demand_handler";
    if let Some(path) = std::env::var_os("FC_UFFD_HANDLER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "$FC_UFFD_HANDLER ({}) is not a file",
                path.display()
            ))
        };
    }
    vendored(NAME)
        .or_else(|| crate::on_path(NAME))
        .ok_or_else(|| format!("no {NAME} ($FC_UFFD_HANDLER, ../shared/vendor/firecracker, PATH)"))
}

/// Whether this machine can run a Firecracker VM at all; `Err` says why not.
pub fn available() -> Result<PathBuf, String> {
    let binary = binary()?;
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm".into());
    }
    if Command::new("cc").arg("--version").output().is_err() {
        return Err("no C compiler (cc) to build the guest".into());
    }
    Ok(binary)
}

/// Builds the guest ELF into `dir`.
pub fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    crate::compile_guest(
        dir,
        "guest.S",
        GUEST_ASM,
        "guest.elf",
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-Wl,-Ttext=0x200000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
        ],
    )
}

/// A Firecracker snapshot of the guest: its device state and memory.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The device state.
    pub vmstate: PathBuf,
    /// The memory file.
    pub memory: PathBuf,
}

/// The fixture, made once per test process in a directory kept until it exits.
pub fn fixture() -> Result<Fixture, String> {
    static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let binary = available()?;
            let dir = tempfile::Builder::new()
                .prefix("pagerd-fc-fixture")
                .tempdir()
                .map_err(|e| e.to_string())?
                .keep();
            make_fixture(&binary, &dir)
        })
        .clone()
}

/// Kills a Firecracker process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api(socket: &Path, method: &str, path: &str, body: &str) -> Result<(), String> {
    let r = http::request(socket, method, path, Some(body), Duration::from_secs(30))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    if r.is_success() {
        Ok(())
    } else {
        Err(format!("{method} {path}: {} {}", r.status, r.body))
    }
}

fn make_fixture(binary: &Path, dir: &Path) -> Result<Fixture, String> {
    let elf = build_guest(dir)?;
    let socket = dir.join("api.sock");
    let console = dir.join("console.log");
    let child = Command::new(binary)
        .arg("--api-sock")
        .arg(&socket)
        .args(["--level", "Error"])
        .arg("--log-path")
        .arg({
            let log = dir.join("firecracker.log");
            std::fs::write(&log, b"").map_err(|e| e.to_string())?;
            log
        })
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start firecracker: {e}"))?;
    let _vm = Reaped(child);
    if !crate::poll_until(crate::DEADLINE, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }) {
        return Err("firecracker's API socket never came up".into());
    }
    let boot = serde_json::json!({"kernel_image_path": elf}).to_string();
    api(&socket, "PUT", "/boot-source", &boot)?;
    let machine = serde_json::json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}).to_string();
    api(&socket, "PUT", "/machine-config", &machine)?;
    api(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    )?;
    if !crate::poll_until(crate::DEADLINE, || count(&console, "OK") >= 1) {
        return Err(format!(
            "the guest never reported: {:?}",
            std::fs::read_to_string(&console).unwrap_or_default()
        ));
    }
    api(&socket, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
    let fixture = Fixture {
        vmstate: dir.join("vmstate"),
        memory: dir.join("memory"),
    };
    let create = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": fixture.vmstate,
        "mem_file_path": fixture.memory,
    })
    .to_string();
    api(&socket, "PUT", "/snapshot/create", &create)?;
    Ok(fixture)
}

/// How many lines of the console log at `path` are exactly `line`.
pub fn count(path: &Path, line: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == line)
        .count()
}

/// SIGKILLs, when dropped, every hypervisor still alive that pagerd launched in a state
/// directory (VMs outlive pagerd by design, so a test must not leave them behind).
#[derive(Debug)]
pub struct VmReaper {
    state: PathBuf,
}

impl VmReaper {
    /// Reaps the VMs of the state directory `state`.
    pub fn new(state: &Path) -> Self {
        Self {
            state: state.to_owned(),
        }
    }
}

impl Drop for VmReaper {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.state.join("vms")) else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(bytes) = std::fs::read(dir.path().join("vm.json")) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let Some(pid) = record["pid"].as_i64().and_then(|p| i32::try_from(p).ok()) else {
                continue;
            };
            // Only the very process pagerd started: its API socket is in this VM's directory.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let socket = dir.path().join("api.sock");
            if String::from_utf8_lossy(&cmdline).contains(&*socket.to_string_lossy()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Waits until the console of launched VM `vm` shows `passes` good checks of its memory (the
/// guest prints `OK` per pass), and asserts that none failed (`BAD`).
pub fn wait_ok(vm: &proto::model::VmInfo, passes: usize) {
    let log = &vm.console_log;
    crate::wait_until(
        &format!("VM {} to check its memory", vm.id),
        crate::DEADLINE,
        || count(log, "OK") >= passes || count(log, "BAD") > 0,
    );
    assert_eq!(
        count(log, "BAD"),
        0,
        "VM {}: {}",
        vm.id,
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
