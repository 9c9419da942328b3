//! Real QEMU VMs for the end-to-end tests: a tiny 32-bit guest booted through PVH (an ELF
//! note QEMU's `-kernel` understands), and a bundle of it made once per test process.
//!
//! ```text
//! guest: fill 8 MiB at 16 MiB with 0x5a17c0de ─▶ "READY\n" on COM1 ─▶ loop: check ─▶ "OK\n"|"BAD\n"
//! bundle: QEMU (TCG) with RAM = MEMORY mapped share=on ─▶ first "OK" ─▶ QMP stop,
//!         x-ignore-shared, migrate file:VMSTATE (RAM stays in MEMORY) ─▶ quit
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use vmm_glue::qemu::{self, Qmp, RamMapping};

use crate::firecracker::{count, Fixture};

/// Guest memory in bytes.
pub const GUEST_BYTES: u64 = 32 << 20;

const GUEST_ASM: &str = r#"
    .code32
    .section .note.Xen, "a"
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long _start
    .text
    .globl _start
_start:
    mov $0x180000, %esp
    mov $0x1000000, %edi
    mov $0x200000, %ecx
    mov $0x5a17c0de, %eax
    cld
    rep stosl
    mov $ready, %esi
    call puts
1:
    mov $0x1000000, %edi
    mov $0x200000, %ecx
    mov $0x5a17c0de, %eax
    repe scasl
    jne 2f
    mov $ok, %esi
    call puts
    jmp 1b
2:
    mov $bad, %esi
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

/// The QEMU binary, if this machine has one that can restore into a read-only file mapping;
/// `Err` says why not.
pub fn available() -> Result<PathBuf, String> {
    let binary = vmm_glue::find_binary(&qemu::BINARY, None).map_err(|e| e.to_string())?;
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version: Vec<u32> = text
        .split_whitespace()
        .nth(3)
        .unwrap_or("0")
        .split('.')
        .map_while(|p| p.parse().ok())
        .collect();
    if version < vec![8, 2] {
        return Err(format!(
            "{} is older than 8.2 (no rom=off): {}",
            binary.display(),
            text.lines().next().unwrap_or("")
        ));
    }
    Ok(binary)
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bundle, made once per test process in a directory kept until it exits.
pub fn fixture() -> Result<Fixture, String> {
    static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let binary = available()?;
            let dir = tempfile::Builder::new()
                .prefix("pagerd-qemu-fixture")
                .tempdir()
                .map_err(|e| e.to_string())?
                .keep();
            make_fixture(&binary, &dir)
        })
        .clone()
}

fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    crate::compile_guest(
        dir,
        "guest32.S",
        GUEST_ASM,
        "guest32.elf",
        &[
            "-m32",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,-Ttext=0x200000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
        ],
    )
}

fn make_fixture(binary: &Path, dir: &Path) -> Result<Fixture, String> {
    let elf = build_guest(dir)?;
    let fixture = Fixture {
        vmstate: dir.join("vmstate"),
        memory: dir.join("memory"),
    };
    std::fs::File::create(&fixture.memory)
        .and_then(|f| f.set_len(GUEST_BYTES))
        .map_err(|e| e.to_string())?;
    let qmp = dir.join("qmp.sock");
    let console = dir.join("console.log");
    let child = Command::new(binary)
        .args(qemu::machine_args(
            &fixture.memory,
            GUEST_BYTES,
            RamMapping::Shared,
            &qmp,
        ))
        .arg("-kernel")
        .arg(&elf)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start qemu: {e}"))?;
    let _vm = Reaped(child);
    if !crate::poll_until(crate::DEADLINE, || count(&console, "OK") >= 1) {
        return Err(format!(
            "the guest never reported: {:?}",
            std::fs::read_to_string(&console).unwrap_or_default()
        ));
    }
    let mut qmp = Qmp::connect(&qmp).map_err(|e| format!("{e:?}"))?;
    qmp.save(&fixture.vmstate).map_err(|e| format!("{e:?}"))?;
    let _ = qmp.execute("quit", serde_json::json!({}));
    Ok(fixture)
}
