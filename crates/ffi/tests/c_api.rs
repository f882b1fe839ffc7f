//! Compiles `tests/c/vm_map_map_test.c` with the system C compiler against the static library
//! this package builds, checks the struct layout against the Rust side, and runs the C checks.

use std::path::{Path, PathBuf};
use std::process::Command;
use vm_map_map::vm_page;

/// The directory holding `libvm_map_map.a` for the profile this test was built with.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/c_api-<hash>
    let deps = exe.parent().expect("deps dir").to_path_buf();
    for dir in [
        deps.clone(),
        deps.parent().expect("profile dir").to_path_buf(),
    ] {
        if dir.join("libvm_map_map.a").exists() {
            return dir;
        }
    }
    panic!("libvm_map_map.a not found next to {}", exe.display());
}

fn compile(name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-pthread"])
        .arg("-I")
        .arg(manifest.join("include"))
        .arg(manifest.join("tests/c/vm_map_map_test.c"))
        .arg(lib_dir().join("libvm_map_map.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(status.success(), "compiling the C test failed");
    out
}

#[test]
fn header_compiles_alone_in_c11_and_cpp() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let c = dir.join("only_header.c");
    std::fs::write(&c, "#include <stdint.h>\n#include \"vm_map_map.h\"\n#include \"vm_map_map.h\"\nint main(void) { return 0; }\n")
        .expect("write");
    for (compiler, std, src) in [("cc", "-std=c11", &c), ("c++", "-std=c++17", &c)] {
        let lang = if compiler == "c++" {
            vec!["-x", "c++"]
        } else {
            vec![]
        };
        let status = Command::new(compiler)
            .args(lang)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
                "-I",
            ])
            .arg(manifest.join("include"))
            .arg(src)
            .status();
        match status {
            Ok(s) => assert!(s.success(), "{compiler} rejects the header"),
            Err(e) if compiler == "c++" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("running {compiler}: {e}"),
        }
    }
}

#[test]
fn c_layout_matches_rust() {
    let exe = compile("vm_map_map_layout");
    let out = Command::new(&exe)
        .arg("layout")
        .output()
        .expect("run layout");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let c: std::collections::BTreeMap<&str, usize> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, v.parse().expect("number")))
        .collect();
    let rust = [
        ("size", std::mem::size_of::<vm_page>()),
        ("align", std::mem::align_of::<vm_page>()),
        ("virt_addr", std::mem::offset_of!(vm_page, virt_addr)),
        ("phys_addr", std::mem::offset_of!(vm_page, phys_addr)),
        ("curr_page", std::mem::offset_of!(vm_page, curr_page)),
        ("make_page", std::mem::offset_of!(vm_page, make_page)),
        ("prev_page", std::mem::offset_of!(vm_page, prev_page)),
        ("epoch", std::mem::offset_of!(vm_page, epoch)),
        ("access_count", std::mem::offset_of!(vm_page, access_count)),
        ("idle_count", std::mem::offset_of!(vm_page, idle_count)),
        ("wired_count", std::mem::offset_of!(vm_page, wired_count)),
        (
            "flag_pager_io_busy",
            std::mem::offset_of!(vm_page, flag_pager_io_busy),
        ),
        (
            "flag_phys_mem",
            std::mem::offset_of!(vm_page, flag_phys_mem),
        ),
        (
            "flag_phys_protect",
            std::mem::offset_of!(vm_page, flag_phys_protect),
        ),
        (
            "flag_phys_dirty",
            std::mem::offset_of!(vm_page, flag_phys_dirty),
        ),
        (
            "flag_have_curr",
            std::mem::offset_of!(vm_page, flag_have_curr),
        ),
        (
            "flag_have_make",
            std::mem::offset_of!(vm_page, flag_have_make),
        ),
        (
            "flag_have_prev",
            std::mem::offset_of!(vm_page, flag_have_prev),
        ),
        ("reserved", std::mem::offset_of!(vm_page, reserved)),
    ];
    assert_eq!(c.len(), rust.len(), "C printed {c:?}");
    for (name, off) in rust {
        assert_eq!(c.get(name), Some(&off), "{name}: C and Rust disagree");
    }
    assert_eq!(std::mem::size_of::<vm_page>(), 72);
}

#[test]
fn c_program_exercises_every_function() {
    let exe = compile("vm_map_map_test");
    let out = Command::new(&exe).output().expect("run C test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "C test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
