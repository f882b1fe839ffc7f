//! Finding 10: a C callback of `vm_map_map_do_for_all(func, lock != 0)` that calls a writer used
//! to spin forever on the writer lock the walk holds. Now `vm_map_set_page` and
//! `vm_map_remove_page` return `VM_MAP_ERR_IN_LOCKED_WALK` (-3), and `set_page` (no error channel)
//! aborts with a message naming the misuse. A watchdog fails the run if anything hangs.

use std::cell::RefCell;
use std::ffi::c_void;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use vm_map_map::{
    get_page, set_page, vm_map_map_do_for_all, vm_map_page_free, vm_map_page_init,
    vm_map_remove_page, vm_map_set_page, vm_page,
};

/// Aborts the process if it is not dropped within 30 s.
struct Watchdog(#[allow(dead_code)] mpsc::Sender<()>);

fn watchdog(what: &'static str) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(30)) {
            eprintln!("watchdog: {what} still running after 30 s: it deadlocked");
            std::process::abort();
        }
    });
    Watchdog(tx)
}

const ERR_IN_LOCKED_WALK: i32 = -3;

fn a(x: u64) -> *mut c_void {
    x as usize as *mut c_void
}

fn store(addr: u64) {
    let p = vm_map_page_init(a(addr));
    // SAFETY: `p` is a live, exclusively owned descriptor from `vm_map_page_init` (not null: only
    // out of memory returns null, and allocation failure aborts in Rust).
    unsafe { (*p).flag_phys_mem = 1 };
    // SAFETY: `p` points to a readable descriptor.
    unsafe { set_page(p) };
    // SAFETY: `p` comes from `vm_map_page_init` and is freed once; `set_page` kept a copy.
    unsafe { vm_map_page_free(p) };
}

thread_local! {
    /// What the writers returned inside the callback (the callback runs on the walking thread).
    static SEEN: RefCell<Vec<(i32, i32)>> = const { RefCell::new(Vec::new()) };
}

extern "C" fn call_writers(p: *mut vm_page) {
    // SAFETY: the walk passes a valid descriptor for the duration of the call.
    let mut copy = unsafe { *p };
    copy.wired_count = 1234;
    // SAFETY: `copy` is a valid, readable descriptor.
    let set = unsafe { vm_map_set_page(&copy) };
    let removed = vm_map_remove_page(copy.virt_addr);
    SEEN.with(|s| s.borrow_mut().push((set, removed)));
}

#[test]
fn writers_inside_a_locked_walk_return_an_error_instead_of_hanging() {
    let _dog = watchdog("vm_map_set_page inside a locked walk");
    store(0x5100_0000_0000);
    SEEN.with(|s| s.borrow_mut().clear());
    vm_map_map_do_for_all(Some(call_writers), 1);
    let seen = SEEN.with(|s| s.borrow().clone());
    assert!(!seen.is_empty(), "the walk visited nothing");
    assert!(
        seen.iter()
            .all(|&r| r == (ERR_IN_LOCKED_WALK, ERR_IN_LOCKED_WALK)),
        "writers inside a locked walk returned {seen:?}"
    );
    // Nothing was changed by the refused calls, and writers work again after the walk.
    let g = get_page(a(0x5100_0000_0000));
    assert_eq!((g.flag_phys_mem, g.wired_count), (1, 0));
    let mut next = g;
    next.wired_count = 5;
    // SAFETY: `next` is a valid, readable descriptor.
    assert_eq!(unsafe { vm_map_set_page(&next) }, 0);
    assert_eq!(get_page(a(0x5100_0000_0000)).wired_count, 5);
}

#[test]
fn writers_inside_an_unlocked_walk_work() {
    let _dog = watchdog("vm_map_set_page inside an unlocked walk");
    store(0x5200_0000_0000);
    SEEN.with(|s| s.borrow_mut().clear());
    vm_map_map_do_for_all(Some(call_writers), 0);
    let seen = SEEN.with(|s| s.borrow().clone());
    assert!(!seen.is_empty());
    // lock == 0 holds nothing: the writers run (the page may be visited, removed, and so on).
    assert!(seen.iter().all(|&(set, _)| set == 0), "{seen:?}");
}

extern "C" fn call_set_page(p: *mut vm_page) {
    // SAFETY: the walk passes a valid descriptor for the duration of the call.
    unsafe { set_page(p) };
}

extern "C" fn call_locked_walk(_: *mut vm_page) {
    vm_map_map_do_for_all(Some(call_set_page), 1);
}

/// Runs in a child process (see below): set_page inside a locked walk must abort with a message.
#[test]
fn child_set_page_inside_a_locked_walk() {
    let Ok(which) = std::env::var("PAGESNAP_FFI_REENTRY_CHILD") else {
        return;
    };
    let _dog = watchdog("set_page inside a locked walk");
    store(0x5300_0000_0000);
    match which.as_str() {
        "set_page" => vm_map_map_do_for_all(Some(call_set_page), 1),
        _ => vm_map_map_do_for_all(Some(call_locked_walk), 1),
    }
    eprintln!("child: returned normally");
}

#[test]
fn set_page_and_nested_locked_walk_inside_a_locked_walk_abort_with_a_message() {
    let exe = std::env::current_exe().expect("test executable");
    for (which, needle) in [
        (
            "set_page",
            "set_page called from inside vm_map_map_do_for_all",
        ),
        (
            "walk",
            "vm_map_map_do_for_all(lock != 0) called from inside vm_map_map_do_for_all",
        ),
    ] {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "child_set_page_inside_a_locked_walk",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PAGESNAP_FFI_REENTRY_CHILD", which)
            .output()
            .expect("run the child");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{which}: the child did not abort:\n{stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{which}: no clear message:\n{stderr}"
        );
        assert!(!stderr.contains("watchdog"), "{which}: it hung:\n{stderr}");
    }
}
