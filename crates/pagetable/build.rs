//! Sets `cfg(huge_pages)` where the table backs its large arrays with huge pages (`src/huge.rs`):
//! `std` builds for Linux, not under loom (whose model shrinks the arrays) or miri (no mmap).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(huge_pages)");
    let on = |var: &str| std::env::var_os(var).is_some();
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && on("CARGO_FEATURE_STD") && !on("CARGO_CFG_LOOM") && !on("CARGO_CFG_MIRI") {
        println!("cargo::rustc-cfg=huge_pages");
    }
}
